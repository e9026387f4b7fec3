"""The one settings object: environment variables with the ``POOLRELAY_`` prefix, or a ``.env`` file.

Nothing else in the code base reads the environment. Embedded defaults need no configuration at
all: an SQLite file, an in-process Redis (``memory://``), jobs inside the server, a key file and a
generated admin token. PostgreSQL-backed deployments must set ``ENCRYPTION_KEYS`` and
``ADMIN_TOKEN`` explicitly (see :meth:`Settings.production_problems`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POOLRELAY_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = "sqlite:///./poolrelay.db"
    redis_url: str = "memory://"
    encryption_keys: SecretStr | None = None
    admin_token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_attempts: int = Field(default=3, ge=1, le=10)
    log_bodies: bool = False
    max_body_bytes: int = Field(default=33_554_432, ge=1024)
    stream_hold_tokens: int = Field(default=8192, ge=1)
    """Output tokens a stream's first hold covers; the hold grows by as many while the stream
    runs (contract §6)."""
    queue_seconds: float = Field(default=30.0, ge=0, le=3600)
    """How long a request may wait, first come first served, for a free concurrency slot (an
    account's or its key's ``max_concurrency``) before it is refused with 429; 0: never wait."""
    batch_poll_seconds: float = Field(default=60.0, gt=0)
    """How often the workers look at batches in progress (and settle the ended ones)."""

    # Beyond the contract's table: operational knobs with sensible defaults.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    """Per process: ~3× this many PostgreSQL connections at most (ORM pool + hot-path pool)."""
    key_file: Path = Path("./poolrelay.key")
    upstream_connect_timeout: float = Field(default=10.0, gt=0)
    upstream_read_timeout: float = Field(default=600.0, gt=0)
    request_deadline: float = Field(default=120.0, gt=0)
    """Total time budget for failover before the first byte reaches the customer. It also
    bounds each upstream attempt's wait for the response headers (shared out among the
    attempts left), except that a non-streaming Messages request may wait as long as its
    answer is expected to take (``app.relay.forward.header_budget``)."""
    max_request_seconds: float = Field(default=10_800.0, gt=0)
    """The longest a relayed request may run, from its arrival: a stream still running then
    is ended by the relay with one ``error`` event and charged what it used. Reconciliation
    takes a hold older than this (plus a margin) as left behind."""
    client_header_timeout: float = Field(default=30.0, gt=0)
    """Seconds a client connection may take to send a request's headers (from the connection
    or the request's first byte); after that the relay closes the connection."""
    client_body_timeout: float = Field(default=60.0, gt=0)
    """Seconds a ``/v1`` request's whole body may take to arrive; a slower one gets 408
    ``timeout_error`` and the connection is closed."""
    auth_cache_seconds: float = Field(default=0.5, ge=0, le=1.0)
    accounts_refresh_seconds: float = Field(default=2.0, gt=0, le=5.0)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    health_interval_seconds: float = Field(default=15.0, gt=0)
    heartbeat_seconds: int = Field(default=30, ge=1, le=3600)
    """A relay process heart-beats in Redis; a hold whose process stopped heart-beating this
    long ago was left behind by a crash and is finished by reconciliation."""
    request_log_retention_days: int = Field(default=90, ge=0)
    """Older request-log rows are folded into daily usage roll-ups (0 keeps them forever)."""
    webhook_scan_seconds: float = Field(default=2.0, gt=0)
    """Embedded mode: how often the server looks for webhook events (quarantines, low balances,
    exhausted budgets); ``poolrelay worker`` looks every 5 s."""
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    embedded_jobs: bool | None = None
    """Run background jobs inside ``serve``; default: only with ``memory://`` Redis."""

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_memory_redis(self) -> bool:
        return self.redis_url.startswith("memory://")

    @property
    def run_jobs_in_process(self) -> bool:
        if self.embedded_jobs is not None:
            return self.embedded_jobs
        return self.is_memory_redis

    def production_problems(self) -> list[str]:
        """What must be set before a PostgreSQL-backed server may start."""
        problems: list[str] = []
        if not self.is_sqlite:
            if self.encryption_keys is None or not self.encryption_keys.get_secret_value():
                problems.append(
                    "POOLRELAY_ENCRYPTION_KEYS (comma-separated Fernet keys, newest first; "
                    "make one with: python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())')"
                )
            if self.admin_token is None or not self.admin_token.get_secret_value():
                problems.append("POOLRELAY_ADMIN_TOKEN (the bearer token for /admin/*)")
        return problems
