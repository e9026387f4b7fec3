"""Installation metadata: the hashed admin token of embedded installs."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class AppMeta(SQLModel, table=True):
    __tablename__ = "app_meta"

    key: str = Field(primary_key=True, max_length=100)
    value: str = Field(max_length=2000)
