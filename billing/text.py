"""Free text accepted from operators and customers (names, memos, model ids)."""

from __future__ import annotations

from billing.errors import InvalidField

_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def clean_text(
    value: object, field: str, *, max_length: int = 200, allow_empty: bool = False
) -> str:
    """A trimmed string without control characters (PostgreSQL refuses NUL in text)."""
    if not isinstance(value, str):
        raise InvalidField(field, "must be a string")
    value = value.strip()
    if not value and not allow_empty:
        raise InvalidField(field, "must be a non-empty string")
    if len(value) > max_length:
        raise InvalidField(field, f"must be at most {max_length} characters")
    if any((ord(c) < 32 or ord(c) == 127) and c not in _ALLOWED_CONTROLS for c in value):
        raise InvalidField(field, "must not contain control characters")
    return value
