"""Relaying an SSE stream as the bytes arrive, and knowing how it ended.

:class:`RelayStream` is a raw ASGI response. It forwards each upstream chunk unchanged while a
:class:`~app.relay.sse.StreamMeter` parses a copy, and watches the client connection: when the
client goes away the upstream read is cancelled at once. It calls the request's credit
(:class:`app.relay.credit.Credit`) directly: once the stream has started, before each chunk whose
output the hold does not cover yet (:meth:`~app.relay.credit.Credit.cover`; when the balance
cannot grow the hold, the chunk is not sent and the stream ends with one ``error`` event), and
once when it ends. Whatever happens — ``message_stop``, an upstream error event, a broken
upstream connection, a client disconnect, a server shutdown, a hold that cannot grow — the
credit's ``stream_ended`` and ``on_finish`` run exactly once, in a task of its own shielded
from cancellation, so the hold is always settled. A stream still running ``max_seconds`` after
the request arrived is ended by the relay: one ``error`` event, and the usage so far is
charged.

:class:`ClientWatch` watches the client connection while the upstream has not answered yet
(the body is read, so the next ASGI ``receive()`` only returns when the client goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.types import Receive as AsgiReceive

from app.relay.sse import StreamMeter
from pool.upstream import TRANSPORT_ERRORS, UpstreamResponse

if TYPE_CHECKING:
    from app.relay.credit import Credit

log = logging.getLogger("poolrelay.relay")

CREDIT_EXHAUSTED = (
    "Your credit balance is too low to continue this response: it was ended after the output "
    "your balance covers. Please add credit to continue."
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_event(error_type: str, message: str) -> bytes:
    data = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"


class StreamTransform(Protocol):
    """Re-encodes the relayed stream for another dialect (the OpenAI endpoint)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def fail(self, error_type: str, message: str) -> bytes: ...

    def finish(self) -> bytes: ...


class StreamEnd:
    """How the stream ended: ``ok``, ``client_disconnect``, ``upstream_error``.

    ``account_fault``: the upstream account failed the stream (a broken connection, a
    truncated stream, an upstream error event), which counts toward its circuit breaker;
    false for a stream the relay itself ended at ``max_seconds`` (also ``upstream_error``: it
    was used and is charged, but did not end as the upstream meant it to)."""

    def __init__(self) -> None:
        self.status = "ok"
        self.error: str | None = None
        self.first_byte_ms: int | None = None
        self.account_fault = False

    def failed(self, error: str, *, account_fault: bool = True) -> None:
        self.status = "upstream_error"
        self.error = error
        self.account_fault = account_fault

    def cut_for_credit(self) -> None:
        """Ended by the relay because the balance could not grow the hold."""
        self.status = "credit_exhausted"
        self.error = "the balance could not cover more output; the stream was ended"


async def until_disconnect(receive: AsgiReceive) -> None:
    """Return when the client closes the connection (once the request body is read, ASGI's
    ``receive()`` has nothing else to say)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """Cancels the task that made it when the client closes the connection.

    For the wait before the upstream answers: once the request body is read, ASGI's next
    ``receive()`` returns only ``http.disconnect`` (uvicorn remembers it, so a later watcher,
    :class:`RelayStream`'s, sees it again). Call :meth:`stop` as soon as the watched wait
    ends; on ``CancelledError``, :meth:`withdraw` says whether the cancellation was this
    watch's (the client left) and takes it back.
    """

    __slots__ = ("_receive", "_task", "_watcher", "left")

    def __init__(self, receive: AsgiReceive) -> None:
        self.left = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            await until_disconnect(self._receive)
        except Exception:  # no receive channel to watch (an in-process caller): nothing to do
            return
        self.left = True
        if self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        """Stop watching (an in-flight ``receive()`` is cancelled cleanly, consuming nothing)."""
        self._watcher.cancel()

    def withdraw(self) -> bool:
        """After a ``CancelledError``: True when the client's leaving caused it, which is then
        taken back (:meth:`asyncio.Task.uncancel`); False for anyone else's cancellation."""
        if not self.left or self._task is None:
            return False
        self._task.uncancel()
        return True


class RelayStream:
    """``on_finish`` (the lease's end) runs beside the credit's settlement when the stream
    ends."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        headers: list[tuple[str, str]],
        credit: Credit,
        on_finish: Callable[[StreamEnd], Awaitable[None]],
        transform: StreamTransform | None = None,
        *,
        max_seconds: float | None = None,
        started: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.headers = headers
        self.credit = credit
        self.on_finish = on_finish
        self.transform = transform
        self.meter = StreamMeter()
        self.end = StreamEnd()
        self.max_seconds = max_seconds
        """The longest the request may run (``MAX_REQUEST_SECONDS``), from ``started``
        (``time.monotonic()``; default: when the stream starts)."""
        self.started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(until_disconnect(receive))
        pump = asyncio.create_task(self._pump(send))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                self.end.status = "client_disconnect"
                self.end.error = "the client closed the connection"
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            finish = asyncio.create_task(self._finish())
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(finish)

    async def _finish(self) -> None:
        with contextlib.suppress(Exception):
            await self.upstream.aclose()
        end = self.end
        lease = asyncio.ensure_future(self.on_finish(end))
        try:
            await self.credit.stream_ended(self.meter, end.status, end.error)
        except Exception:
            log.exception("finishing a stream failed")
        try:
            await lease
        except Exception:
            log.exception("ending a stream's lease failed")

    async def _pump(self, send: Send) -> None:
        started = time.monotonic()
        meter = self.meter
        transform = self.transform
        credit = self.credit
        await send({"type": "http.response.start", "status": 200, "headers": self._raw_headers()})
        announced = False
        limit: float | None = None
        if self.max_seconds is not None:
            limit = self.max_seconds - (started - (self.started or started))
        longest = asyncio.timeout(limit)
        try:
            async with longest:
                async for chunk in self.upstream.aiter_raw():
                    if not chunk:
                        continue
                    if self.end.first_byte_ms is None:
                        self.end.first_byte_ms = int((time.monotonic() - started) * 1000)
                    if (
                        credit.held_output >= credit.max_tokens
                        or meter.delta_text_bytes + len(chunk) <= credit.held_output
                    ):
                        # covered whatever it holds: the hold covers max_tokens already, or
                        # the chunk's whole length (the usual cases)
                        meter.feed(chunk)
                    else:
                        before, held = meter.copy(), credit.held_output
                        meter.feed(chunk)
                        if meter.delta_text_bytes > held and not await credit.cover(
                            meter.delta_text_bytes
                        ):
                            await self._cut(before, chunk, send)
                            return
                        if announced and credit.held_output != held:  # the hold grew
                            credit.stream_progress(meter)
                    out = transform.feed(chunk) if transform is not None else chunk
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if not announced and meter.started:
                        announced = True
                        credit.stream_progress(meter)
        except TRANSPORT_ERRORS as exc:
            if longest.expired():
                self.end.failed(
                    f"the request ran longer than MAX_REQUEST_SECONDS ({self.max_seconds:g} s) "
                    "and was ended by the relay",
                    account_fault=False,
                )
                message = (
                    "The request exceeded the longest time the relay allows "
                    f"({self.max_seconds:g} s) and was ended."
                )
            else:
                self.end.failed(f"{type(exc).__name__}: the upstream stream broke")
                message = "The upstream connection failed mid-stream."
            if meter.error is None:
                await self._send_error("api_error", message, send)
            await self._close(send)
            return
        if meter.error is not None:
            err = meter.error.get("error") if isinstance(meter.error, dict) else None
            self.end.failed(
                f"upstream error event: {err.get('type') if isinstance(err, dict) else err}"
            )
        elif not meter.stopped:
            self.end.failed("the upstream stream ended before message_stop")
            await self._send_error("api_error", "The upstream stream ended unexpectedly.", send)
        await self._close(send)

    async def _cut(self, before: StreamMeter, chunk: bytes, send: Send) -> None:
        """End the stream at a chunk the hold does not cover: the whole events at its start
        that stay within the hold are sent (and metered), the rest is not."""
        meter, sent = before, 0
        held = self.credit.held_output
        while (end := chunk.find(b"\n\n", sent)) >= 0:
            trial = meter.copy()
            trial.feed(chunk[sent : end + 2])
            if trial.delta_text_bytes > held:
                break
            meter, sent = trial, end + 2
        self.meter = meter
        if sent:
            part = chunk[:sent]
            out = self.transform.feed(part) if self.transform is not None else part
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        if self.credit.cut_for_credit:
            self.end.cut_for_credit()
            await self._send_error("invalid_request_error", CREDIT_EXHAUSTED, send)
        else:
            self.end.failed("the hold could not be extended (database)", account_fault=False)
            await self._send_error(
                "api_error", "The relay could not confirm credit for more output.", send
            )
        await self._close(send)

    async def _send_error(self, error_type: str, message: str, send: Send) -> None:
        if self.transform is not None:
            body = self.transform.fail(error_type, message)
        else:
            body = error_event(error_type, message)
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _close(self, send: Send) -> None:
        tail = self.transform.finish() if self.transform is not None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in self.headers
            if k not in ("cache-control", "x-accel-buffering")
        ]
        out.append((b"cache-control", b"no-cache"))
        out.append((b"x-accel-buffering", b"no"))
        return out
