"""Every error a customer or operator can see, in one table.

Domain errors (``billing.errors``, ``pool.errors``) carry data, never HTTP. :func:`to_api_error`
maps them, and the relay's own errors (:class:`ApiError`), to an HTTP status, an Anthropic error
``type`` and a message. :func:`anthropic_response` renders ``{"type":"error","error":{...}}``
(``/v1/*``, ``/admin/*``); the OpenAI endpoint renders the same table in OpenAI's shape.

::

    ApiError (status, type, message, headers)     raised by app code
    billing.errors.BillingError ─┐
    pool.errors.PoolError ───────┴─► to_api_error() ─► ApiError ─► JSON response
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import orjson
import psycopg
import sqlalchemy.exc
from starlette.responses import Response

from app.relay.openai import anthropic_error_to_openai
from billing import errors as be
from billing.ids import new_id
from billing.money import format_usd
from pool import errors as pe


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = dict(headers or {})


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def authentication(message: str = "invalid x-api-key") -> ApiError:
    return ApiError(401, "authentication_error", message)


def permission(message: str) -> ApiError:
    return ApiError(403, "permission_error", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found_error", message)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "request_too_large", f"Request exceeds the maximum allowed size of {limit} bytes."
    )


def rate_limited(
    message: str, retry_after: float, extra: Mapping[str, str] | None = None
) -> ApiError:
    seconds = max(1, min(60, math.ceil(retry_after)))
    headers = {"retry-after": str(seconds), "x-should-retry": "true", **(extra or {})}
    return ApiError(429, "rate_limit_error", message, headers)


def overloaded(message: str = "No upstream account can serve this request right now.") -> ApiError:
    return ApiError(529, "overloaded_error", message, {"x-should-retry": "true"})


CREDIT_TOO_LOW = (
    "Your credit balance is too low to complete this request. Please top up your poolrelay balance."
)


def to_api_error(exc: Exception) -> ApiError:
    """The one table from domain errors to HTTP."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, be.InsufficientBalance):
        return ApiError(
            400,
            "invalid_request_error",
            f"Your credit balance is too low to access this model: the request may cost up to "
            f"{format_usd(exc.needed_micros)} USD and {format_usd(max(exc.available_micros, 0))} "
            "USD is available. Please top up your poolrelay balance.",
            {"x-should-retry": "false"},
        )
    if isinstance(exc, be.CustomerSuspended):
        return ApiError(
            403,
            "permission_error",
            "This customer account is suspended.",
            {"x-should-retry": "false"},
        )
    if isinstance(exc, be.NoPrice):
        return invalid_request(
            f"model: {exc.model!r} is not available on this relay (no price is set for it)"
        )
    if isinstance(exc, be.BudgetExceeded):
        return ApiError(
            403,
            "permission_error",
            f"This key's {exc.scope} budget of {format_usd(exc.limit_micros)} USD is exhausted.",
            {"x-should-retry": "false"},
        )
    if isinstance(exc, be.CustomerNotFound):
        return not_found(f"customer {exc.customer_id!r} not found")
    if isinstance(exc, be.KeyNotFound):
        return not_found(f"key {exc.key_id!r} not found")
    if isinstance(exc, be.IdempotencyConflict):
        return ApiError(
            409,
            "invalid_request_error",
            "This Idempotency-Key was already used with different parameters.",
        )
    if isinstance(exc, be.InvalidAmount):
        return invalid_request(f"{exc.field}: {exc.reason}")
    if isinstance(exc, be.InvalidField):
        return invalid_request(f"{exc.field}: {exc.reason}")
    if isinstance(exc, pe.NoCapacity):
        if exc.concurrency:
            return rate_limited(
                "The pool is at its concurrency limit: every upstream account that can serve "
                "this request has all its max_concurrency slots taken (none freed within "
                "QUEUE_SECONDS); retry shortly.",
                exc.retry_after,
            )
        return rate_limited(
            "Every upstream account is at its rate limit; retry shortly.", exc.retry_after
        )
    if isinstance(exc, pe.NoAccount):
        return overloaded()
    if isinstance(exc, pe.AccountNotFound):
        return not_found(str(exc))
    if isinstance(exc, pe.AccountExists):
        return ApiError(409, "invalid_request_error", str(exc))
    if isinstance(exc, pe.CredentialError):
        return invalid_request(str(exc))
    if isinstance(exc, be.BillingError | pe.PoolError):
        return invalid_request(str(exc))
    dependency = unreachable_dependency(exc)
    if dependency is not None:
        return ApiError(
            529,
            "overloaded_error",
            f"poolrelay cannot reach its {dependency} right now; nothing was charged. "
            "Retry shortly.",
        )
    return ApiError(500, "api_error", "Internal server error")


_DEPENDENCIES = (
    ("redis", "Redis"),
    ("fakeredis", "Redis"),
    ("psycopg_pool", "database"),
    ("psycopg", "database"),
    ("sqlalchemy", "database"),
    ("aiosqlite", "database"),
    ("sqlite3", "database"),
)


_OUTAGE_ERRORS = frozenset(
    {
        "OperationalError",
        "InterfaceError",
        "DisconnectionError",
        "ConnectionError",
        "TimeoutError",
        "PoolTimeout",
        "PoolClosed",
        "BusyLoadingError",
        "ReadOnlyError",
        "MasterDownError",
        "TryAgainError",
        "ClusterDownError",
    }
)
"""Exception class names that mean the dependency is down or restarting (not that a statement
was wrong: a data error stays a 500 and is logged)."""


def unreachable_dependency(exc: BaseException) -> str | None:
    """ "database" or "Redis" when ``exc`` (or what caused it) is that dependency failing (an
    outage, a restart), else None: the customer is told to retry, not shown a bare 500."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        module = type(seen).__module__
        if type(seen).__name__ in _OUTAGE_ERRORS:
            for prefix, name in _DEPENDENCIES:
                if module == prefix or module.startswith(prefix + "."):
                    return name
        if isinstance(seen, psycopg.OperationalError):
            # every subclass too: the server shutting down (AdminShutdown, CrashShutdown),
            # starting up (CannotConnectNow), out of connections, a statement timeout, and
            # psycopg_pool's PoolTimeout
            return "database"
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return "database"  # whatever the driver called it, the connection was lost
        if isinstance(seen, ConnectionError | TimeoutError):
            return "database or Redis"
        seen = seen.__cause__ or seen.__context__
    return None


def should_retry(status: int) -> bool:
    """``x-should-retry`` as Anthropic sends it: retry 408, 409, 429 and every 5xx (529 too);
    never 400, 401, 403, 404 or 413 (a wrong key must make a client stop at once)."""
    return status in (408, 409, 429) or status >= 500


def relay_headers(
    request_id: str | None, status: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Headers of a response the relay makes itself: ``request-id`` and
    ``x-poolrelay-request-id`` (the same id, so the SDKs' ``request_id`` is set) and, on an
    error, ``x-should-retry`` (unless the error already decided it)."""
    request_id = request_id or new_id("req")
    headers = dict(extra or {})
    headers["request-id"] = request_id
    headers["x-poolrelay-request-id"] = request_id
    if status >= 400:
        headers.setdefault("x-should-retry", "true" if should_retry(status) else "false")
    return headers


def error_body(err: ApiError, request_id: str) -> bytes:
    body: dict[str, object] = {
        "type": "error",
        "error": {"type": err.type, "message": err.message},
        "request_id": request_id,
    }
    return orjson.dumps(body)


def anthropic_response(err: ApiError, request_id: str | None = None) -> Response:
    headers = relay_headers(request_id, err.status, err.headers)
    return Response(
        error_body(err, headers["request-id"]),
        status_code=err.status,
        headers=headers,
        media_type="application/json",
    )


def openai_response(err: ApiError, request_id: str | None = None) -> Response:
    """The same error in OpenAI's shape ``{"error": {message, type, param, code}}`` (for
    ``/v1/chat/completions`` and OpenAI clients of ``/v1/models``); same status and headers."""
    headers = relay_headers(request_id, err.status, err.headers)
    body = anthropic_error_to_openai(
        err.status, {"type": "error", "error": {"type": err.type, "message": err.message}}
    )
    return Response(
        orjson.dumps(body), status_code=err.status, headers=headers, media_type="application/json"
    )


def error_response(
    err: ApiError, request_id: str | None = None, *, openai: bool = False
) -> Response:
    return openai_response(err, request_id) if openai else anthropic_response(err, request_id)
