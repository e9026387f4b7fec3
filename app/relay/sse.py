"""Server-sent events on the way through: the relay forwards the original bytes untouched and
feeds a copy to a :class:`StreamMeter`, which keeps what billing needs to know.

:class:`SSEParser` is an incremental parser of the ``text/event-stream`` format (WHATWG HTML
§9.2): lines end in ``\\n``, ``\\r\\n`` or ``\\r`` (a ``\\r\\n`` split across two chunks counts
once), ``data:`` lines of one event are joined with ``\\n``, ``:`` lines are comments, one space
after the colon is dropped, unknown fields, ``id`` and ``retry`` are ignored, an event is
dispatched at a blank line when it has data, and an event not closed by a blank line when the
stream ends is dropped. Chunks may split anything, UTF-8 sequences included: text is decoded
per complete line only. Each chunk is scanned once; an unfinished line is kept as a list of
pieces, so a long line arriving in many chunks is not re-scanned or re-copied per chunk.
:meth:`SSEParser.scan_deltas` is the byte scan for the common chunk (one or more whole
``content_block_delta`` events, the parser between events): no line splitting at all.

:class:`StreamMeter` follows an Anthropic Messages stream (spec §2). Only ``message_start``,
``message_delta`` and ``error`` are JSON-parsed (with orjson); ``ping`` and
``content_block_start``/``_stop`` are skipped, and ``content_block_delta`` (most of a stream) is
only measured: its payload size is the event's data length less the fixed envelope of its
delta kind, found by a substring test that cannot match inside a JSON string (a quote there is
always escaped). Bad JSON and unexpected shapes are ignored, never raised. A chunk of whole
deltas (most chunks of a stream) is metered by :meth:`SSEParser.scan_deltas`'s byte scan alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from billing.pricing import Usage

__all__ = ["SSEEvent", "SSEParser", "StreamMeter"]

_BOM: Final = b"\xef\xbb\xbf"
_DELTA_LINES: Final = b"event: content_block_delta\ndata: "
_DELTA_HEAD: Final = len(_DELTA_LINES)


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: ``event`` is ``"message"`` when the stream named none."""

    event: str
    data: str


class SSEParser:
    """Incremental SSE parser: feed byte chunks as they arrive, get complete events back."""

    __slots__ = ("_between", "_data", "_event", "_first_line", "_partial", "_skip_lf")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # pieces of the unfinished last line
        self._skip_lf = False  # the previous chunk ended in "\r": drop a leading "\n"
        self._first_line = True
        self._event = b""
        self._data: list[bytes] | None = None
        self._between = False  # between events, past the first line: scan_deltas may apply

    def scan_deltas(self, chunk: bytes) -> list[bytes] | None:
        """The byte scan: when the parser is between events and ``chunk`` is nothing but whole
        events written ``event: content_block_delta\ndata: <one line>\n\n``, the data of
        each, as :meth:`feed_raw` would return them (and the parser's state is what parsing
        them would leave: between events); else None, and nothing is consumed.

        Each event must hold exactly one newline before its blank line (the one between its
        two lines), so nothing that parses differently can pass: a data value cannot hide a
        line break or another field.
        """
        if not self._between or not chunk.startswith(_DELTA_LINES) or b"\r" in chunk:
            return None
        newlines = chunk.count(b"\n")
        if newlines == 3:  # the usual chunk: one event
            return [chunk[_DELTA_HEAD:-2]] if chunk.endswith(b"\n\n") else None
        events = chunk.split(b"\n\n")
        if events.pop() or newlines != 3 * len(events):  # must end with a blank line
            return None
        for event in events:
            if not event.startswith(_DELTA_LINES) or event.count(b"\n") != 1:
                return None
        return [event[_DELTA_HEAD:] for event in events]

    def copy(self) -> SSEParser:
        twin = SSEParser()
        twin._partial = list(self._partial)
        twin._skip_lf = self._skip_lf
        twin._first_line = self._first_line
        twin._event = self._event
        twin._data = None if self._data is None else list(self._data)
        twin._between = self._between
        return twin

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completes, decoded as UTF-8."""
        return [
            SSEEvent(
                event.decode("utf-8", "replace") if event else "message",
                data.decode("utf-8", "replace"),
            )
            for event, data in self.feed_raw(chunk)
        ]

    def feed_raw(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Like :meth:`feed`, but return ``(event name, data)`` as undecoded bytes.

        The event name is ``b""`` when the stream named none.
        """
        if not chunk:
            return []
        self._between = False
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            self._skip_lf = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            self._partial.append(chunk)
            return []
        lines = chunk.split(b"\n")
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial = []
        tail = lines.pop()
        if tail:
            self._partial.append(tail)
        if self._first_line:
            self._first_line = False
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][len(_BOM) :]
        events: list[tuple[bytes, bytes]] = []
        for line in lines:
            if not line:
                data = self._data
                if data is not None:
                    events.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                    self._data = None
                self._event = b""
                continue
            if line[0] == 0x3A:  # ":" comment
                continue
            colon = line.find(b":")
            if colon < 0:
                field, value = line, b""
            else:
                field = line[:colon]
                value = line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if field == b"data":
                if self._data is None:
                    self._data = [value]
                else:
                    self._data.append(value)
            elif field == b"event":
                self._event = value
        self._between = (
            not self._partial and self._data is None and not self._event and not self._skip_lf
        )
        return events


# Envelope of each measured delta kind: the compact JSON of the event with an empty payload,
# e.g. {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}.
_DELTA_ENVELOPES: Final = (
    (b'"text_delta"', 80),
    (b'"input_json_delta"', 94),
    (b'"thinking_delta"', 88),
)
_SKIPPED: Final = frozenset({b"ping", b"content_block_start", b"content_block_stop"})
_BYTES_PER_TOKEN: Final = 4


def _payload_bytes(data: bytes) -> int:
    """Approximate bytes of a text/partial_json/thinking delta's payload (JSON-escaped)."""
    for marker, envelope in _DELTA_ENVELOPES:
        if marker in data:
            return max(0, len(data) - envelope)
    return 0  # signature_delta, citations_delta, unknown: not output text


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class StreamMeter:
    """What the relay must know about an Anthropic stream, updated chunk by chunk.

    ``usage`` is the ``message_start`` usage with every ``message_delta`` usage written over it,
    field by non-null field (spec §2; the same as the SDK's accumulator). Until a
    ``message_delta`` arrives, ``usage.output_tokens`` is message_start's small starting count.
    """

    __slots__ = (
        "_deltas_at_final",
        "_parser",
        "delta_text_bytes",
        "deltas",
        "error",
        "message_id",
        "model",
        "started",
        "stop_reason",
        "stopped",
        "usage",
    )

    def __init__(self) -> None:
        self._parser = SSEParser()
        self.message_id: str | None = None
        self.model: str | None = None
        self.usage = Usage()
        self.started = False
        self.stopped = False
        self.error: dict[str, Any] | None = None
        self.delta_text_bytes = 0
        self.deltas = 0
        self.stop_reason: str | None = None
        self._deltas_at_final: int | None = None  # `deltas` when a message_delta gave usage

    def copy(self) -> StreamMeter:
        """An independent meter in the same state (to try a chunk and take it back)."""
        twin = StreamMeter()
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name))
        twin._parser = self._parser.copy()
        return twin

    def feed(self, chunk: bytes) -> None:
        """Parse a copy of ``chunk`` and update the state. Never raises on bad input."""
        deltas = self._parser.scan_deltas(chunk)
        if deltas is not None:  # whole content_block_delta events: counted, never parsed
            self.deltas += len(deltas)
            for data in deltas:
                self.delta_text_bytes += _payload_bytes(data)
            return
        for name, data in self._parser.feed_raw(chunk):
            if name == b"content_block_delta":
                self.deltas += 1
                self.delta_text_bytes += _payload_bytes(data)
            elif name in _SKIPPED:
                continue
            elif name == b"message_stop":
                self.stopped = True
            elif name in (b"message_start", b"message_delta", b"error"):
                self._parsed(name.decode(), data, _loads(data))
            elif not name or name == b"message":  # unnamed: dispatch on the JSON's "type"
                payload = _loads(data)
                kind = payload.get("type") if payload is not None else None
                if kind == "content_block_delta":
                    self.deltas += 1
                    self.delta_text_bytes += _payload_bytes(data)
                elif kind == "message_stop":
                    self.stopped = True
                elif isinstance(kind, str):
                    self._parsed(kind, data, payload)
            # anything else: an event type this relay does not know; forwarded, not metered

    def _parsed(self, kind: str, data: bytes, payload: dict[str, Any] | None) -> None:
        if kind == "error":
            if payload is None:
                text = data.decode("utf-8", "replace")[:500]
                payload = {"type": "error", "error": {"type": "api_error", "message": text}}
            self.error = payload
            return
        if payload is None:
            return
        if kind == "message_start":
            message = payload.get("message")
            if not isinstance(message, dict):
                return
            self.started = True
            message_id, model = message.get("id"), message.get("model")
            self.message_id = message_id if isinstance(message_id, str) else self.message_id
            self.model = model if isinstance(model, str) else self.model
            self.usage = Usage.from_api(message.get("usage"))
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                stop_reason = delta.get("stop_reason")
                if isinstance(stop_reason, str):
                    self.stop_reason = stop_reason
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self.usage = self.usage.merged(usage)
                if isinstance(usage.get("output_tokens"), int):
                    self._deltas_at_final = self.deltas

    def estimated_output_tokens(self) -> int:
        """Output tokens to bill when the stream may not have reported its final count.

        Once a ``message_delta`` has reported ``output_tokens`` and no content came after it,
        that count is authoritative and returned as is. Otherwise: the largest of the count
        seen so far, the number of content deltas relayed (each carries at least one token) and
        ``ceil(delta_text_bytes / 4)`` (about 4 bytes per token in English; a safe side for
        code, and JSON escapes make the byte count of non-ASCII text larger, not smaller).
        """
        if self._deltas_at_final is not None and self._deltas_at_final == self.deltas:
            return self.usage.output_tokens
        by_bytes = -(-self.delta_text_bytes // _BYTES_PER_TOKEN)
        return max(self.usage.output_tokens, self.deltas, by_bytes)

    def billable_usage(self) -> Usage:
        """``usage`` with ``output_tokens`` from :meth:`estimated_output_tokens`."""
        output = self.estimated_output_tokens()
        if output == self.usage.output_tokens:
            return self.usage
        return self.usage.merged({"output_tokens": output})
