"""Browser clients of ``/v1/*``, answered as Anthropic answers them.

Anthropic serves browsers only when they opt in with ``anthropic-dangerous-direct-browser-access:
true`` (the TypeScript SDK's ``dangerouslyAllowBrowser``): such a request gets
``access-control-allow-origin: *`` and ``access-control-expose-headers: *``; a cross-origin
request without it gets 401 "CORS requests must set 'anthropic-dangerous-direct-browser-access'
header" and no CORS headers, so the browser shows the page nothing. Preflights (``OPTIONS``)
cannot carry the header's value and are answered for every origin. A same-origin request (the
customer portal) is not a CORS request. ``/admin/*`` never answers with CORS headers.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Message, Scope, Send

from app import errors

OPT_IN = b"anthropic-dangerous-direct-browser-access"
ALLOW = [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", b"*")]
METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _cross_origin(scope: Scope) -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return False
    host = _header(scope, b"host")
    return host is None or origin.split(b"://", 1)[-1].rstrip(b"/") != host


def preflight(scope: Scope) -> Response | None:
    """The answer to a CORS preflight, or None when ``scope`` is not one."""
    if scope["method"] != "OPTIONS":
        return None
    requested = _header(scope, b"access-control-request-headers")
    return Response(
        status_code=200,
        headers={
            "access-control-allow-origin": "*",
            "access-control-allow-methods": METHODS,
            "access-control-allow-headers": requested.decode("latin-1") if requested else "*",
            "access-control-max-age": "86400",
        },
    )


def refusal(scope: Scope) -> Response | None:
    """The 401 for a cross-origin request that did not opt in; None when it may go on."""
    if not _cross_origin(scope):
        return None
    if (_header(scope, OPT_IN) or b"").strip().lower() == b"true":
        return None
    return errors.anthropic_response(
        errors.authentication(
            "CORS requests must set 'anthropic-dangerous-direct-browser-access' header"
        )
    )


def allowing(scope: Scope, send: Send) -> Send:
    """``send`` that adds the CORS headers to an opted-in cross-origin request's answer."""
    if not _cross_origin(scope):
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *ALLOW]}
        await send(message)

    return wrapped
