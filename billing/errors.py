"""Billing errors: data, never HTTP.

Every error raised by the ``billing`` package derives from :class:`BillingError` and carries the
facts of the failure as attributes; ``app/errors.py`` maps each class to an Anthropic- or
OpenAI-shaped response in one table. ``str()`` gives a message fit for that response: no
secrets, money as decimal USD strings.

::

    BillingError
    ├── InvalidField(field, reason)                     bad input to a billing service
    │   └── InvalidAmount(field, reason)                a money value that is not an exact amount
    ├── NoPrice(model)                                  no price row matches the model
    ├── InsufficientBalance(needed_micros, available_micros)
    ├── CustomerNotFound(customer_id)
    ├── CustomerSuspended(customer_id)
    ├── KeyNotFound(key_id)
    ├── IdempotencyConflict(key)                        key reused with a different request
    └── BudgetExceeded(scope, limit_micros)             a key's daily or monthly budget is used up

``InvalidField`` (and so ``InvalidAmount``) is also a :class:`ValueError`, so a pydantic validator
that calls ``billing.money.parse_usd`` turns a bad amount into an ordinary validation error.
"""

from __future__ import annotations

from decimal import Decimal

__all__ = [
    "BillingError",
    "BudgetExceeded",
    "CustomerNotFound",
    "CustomerSuspended",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InvalidAmount",
    "InvalidField",
    "KeyNotFound",
    "NoPrice",
]


def _usd(micros: int) -> str:
    """Micro-USD as the USD string of a message (exact decimal arithmetic, no float; what
    :func:`billing.money.format_usd` gives — money imports this module, not the reverse)."""
    return f"{Decimal(micros).scaleb(-6):.6f}"


class BillingError(Exception):
    """Base of every billing error. Subclasses keep their facts as attributes."""


class InvalidField(BillingError, ValueError):
    """A field of a billing request is unusable; ``reason`` says why in plain words."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidAmount(InvalidField):
    """A money value (USD amount, price, multiplier) that is not an exact, sane decimal."""


class NoPrice(BillingError):
    """No price row matches ``model`` (neither exactly nor by prefix)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model

    def __str__(self) -> str:
        return f"model {self.model!r} has no price and cannot be billed"


class InsufficientBalance(BillingError):
    """The hold (``needed_micros``) does not fit in balance minus holds (``available_micros``)."""

    def __init__(self, needed_micros: int, available_micros: int) -> None:
        super().__init__(needed_micros, available_micros)
        self.needed_micros = needed_micros
        self.available_micros = available_micros

    def __str__(self) -> str:
        return (
            "Your credit balance is too low to access the Anthropic API: this request may cost "
            f"up to {_usd(self.needed_micros)} USD and {_usd(self.available_micros)} USD is "
            "available."
        )


class CustomerNotFound(BillingError):
    def __init__(self, customer_id: str) -> None:
        super().__init__(customer_id)
        self.customer_id = customer_id

    def __str__(self) -> str:
        return f"customer {self.customer_id!r} not found"


class CustomerSuspended(BillingError):
    def __init__(self, customer_id: str) -> None:
        super().__init__(customer_id)
        self.customer_id = customer_id

    def __str__(self) -> str:
        return f"customer {self.customer_id!r} is suspended"


class KeyNotFound(BillingError):
    def __init__(self, key_id: str) -> None:
        super().__init__(key_id)
        self.key_id = key_id

    def __str__(self) -> str:
        return f"key {self.key_id!r} not found"


class IdempotencyConflict(BillingError):
    """An idempotency key was reused for a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} was already used for a different request"


class BudgetExceeded(BillingError):
    """A budget (``scope``: e.g. ``"daily"`` or ``"monthly"``) of ``limit_micros`` is used up."""

    def __init__(self, scope: str, limit_micros: int) -> None:
        super().__init__(scope, limit_micros)
        self.scope = scope
        self.limit_micros = limit_micros

    def __str__(self) -> str:
        return f"the {self.scope} budget of {_usd(self.limit_micros)} USD is exhausted"
