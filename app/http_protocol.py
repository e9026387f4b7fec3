"""The HTTP protocol the relay serves with: uvicorn's httptools protocol plus a deadline on
the request headers.

uvicorn has no timeout for a connection that never completes its request headers (a slowloris
client holds it forever). :class:`HeaderTimeoutProtocol` closes a connection whose request
headers are not complete ``CLIENT_HEADER_TIMEOUT`` seconds after the connection was made, or
after the first byte of a later request on a kept-alive connection; between requests uvicorn's
own keep-alive timeout still closes idle connections. ``poolrelay serve`` passes
:func:`http_protocol` to uvicorn as ``http=``.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("poolrelay.http")


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers take longer
    than ``header_timeout`` seconds: from the connection's start, and from the first byte of
    each later request on a kept-alive connection (between requests uvicorn's keep-alive
    timeout applies). Made with :func:`http_protocol`."""

    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers behind a response still being sent: wait on.
            self._arm_header_timer()
            return
        log.info("closing a connection whose request headers took over %gs", self.header_timeout)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def http_protocol(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (``http=``), with its header timeout."""
    return type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout}
    )
