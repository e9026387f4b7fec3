"""Errors raised by the pool.

They carry data, never HTTP: ``app/errors.py`` maps them to responses.

::

    PoolError                 base class of every pool error
    ├── NoCapacity            every eligible account is rate limited or has no free slot
    │                         (the relay answers 429 rate_limit_error, retry-after = .retry_after)
    ├── Queued                only a concurrency cap stood in the way: the request is queued
    │                         (.ticket) and is handed a slot when one frees (pool.waiters)
    ├── NoAccount             nothing can serve: every candidate is quarantined for another
    │                         reason, disabled, excluded, or the candidate list is empty
    │                         (the relay answers 529 overloaded_error)
    ├── AccountNotFound       no live account has this id or name (.ref)
    ├── AccountExists         a live account already has this name (.name)
    └── CredentialError       a credential or account setting is unusable (bad key, bad value)
"""

from __future__ import annotations

__all__ = [
    "AccountExists",
    "AccountNotFound",
    "CredentialError",
    "NoAccount",
    "NoCapacity",
    "PoolError",
    "Queued",
]


class PoolError(Exception):
    """Base class of every error the pool raises."""


class NoCapacity(PoolError):
    """Candidates exist, but each is rate limited or at its concurrency cap.

    ``retry_after`` is the number of seconds (≥ 1) until the first of them is expected to
    free up: the earliest end of a ``rate_limited`` quarantine, or the earliest lease expiry
    of an account whose slots are all taken.
    """

    def __init__(self, retry_after: float, *, concurrency: bool = False) -> None:
        self.retry_after = max(1.0, float(retry_after))
        self.concurrency = concurrency
        """True when concurrency caps (not rate limits) are what is full."""
        super().__init__(f"no account has capacity; retry after {self.retry_after:.0f} s")


class Queued(PoolError):
    """The request waits for a concurrency slot: ``ticket`` is its place in the queue,
    ``lease_id`` the lease it will be given, ``until`` (epoch seconds) when it gives up."""

    def __init__(self, ticket: str, lease_id: str, until: float) -> None:
        self.ticket = ticket
        self.lease_id = lease_id
        self.until = until
        super().__init__("waiting for a concurrency slot")


class NoAccount(PoolError):
    """No candidate can serve at all (quarantined for a reason other than rate limits,
    disabled, excluded by failover, or none allows the model)."""

    def __init__(self) -> None:
        super().__init__("no upstream account can serve this request")


class AccountNotFound(PoolError):
    """No live account has this id or name."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"account {ref!r} not found")


class AccountExists(PoolError):
    """A live account already has this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an account named {name!r} already exists")


class CredentialError(PoolError):
    """A credential or an account setting cannot be used; the message says why (never the
    credential itself)."""
