"""The usage meter's byte scan (``SSEParser.scan_deltas``) reads exactly what the parse reads.

The scan meters chunks of whole ``content_block_delta`` events without splitting lines; these
properties check that whatever it accepts, the full parser would have returned the same events
and left the same state, and that a meter using it ends every stream (any chunking, any line
endings, hostile text) with the same usage, counts and estimate as one that parses every chunk.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.relay.sse import SSEParser, StreamMeter

DELTA = b"event: content_block_delta\ndata: "


class ParseOnly(SSEParser):
    """The reference: never scans."""

    __slots__ = ()

    def scan_deltas(self, chunk: bytes) -> list[bytes] | None:
        return None


def state(parser: SSEParser) -> tuple[Any, ...]:
    return tuple(getattr(parser, name) for name in SSEParser.__slots__ if name != "_between")


def meter_view(meter: StreamMeter) -> dict[str, Any]:
    return {
        "usage": meter.usage,
        "billable": meter.billable_usage(),
        "estimate": meter.estimated_output_tokens(),
        "deltas": meter.deltas,
        "delta_text_bytes": meter.delta_text_bytes,
        "message_id": meter.message_id,
        "model": meter.model,
        "started": meter.started,
        "stopped": meter.stopped,
        "stop_reason": meter.stop_reason,
        "error": meter.error,
    }


# Text that tries to look like SSE framing, escapes, quotes and multibyte characters.
PIECES = [
    *'ab Z09{}[]:,"\\/',
    *["\n", "\r", "\t", "☃", "日本", "🎉", "\x00", "\u2028"],
    *["event: content_block_delta", "data: ", "\n\n", "text_delta"],
]
texts = st.lists(st.sampled_from(PIECES), max_size=16).map("".join)


def delta_event(text: str, kind: str) -> bytes:
    field = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}
    payload = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": kind, field[kind]: text},
    }
    return DELTA + orjson.dumps(payload) + b"\n\n"


def event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    usage = {"input_tokens": draw(st.integers(0, 10**6)), "output_tokens": 1}
    message = {"id": "msg_1", "type": "message", "model": "claude-x", "content": [], "usage": usage}
    parts = [event("message_start", {"type": "message_start", "message": message})]
    parts.append(event("ping", {"type": "ping"}))
    kinds = st.sampled_from(["text_delta", "input_json_delta", "thinking_delta"])
    for text, kind in draw(st.lists(st.tuples(texts, kinds), max_size=12)):
        parts.append(delta_event(text, kind))
        if draw(st.booleans()) and draw(st.booleans()):
            parts.append(draw(st.sampled_from([b": keep-alive\n", b"\n", b"event: ping\n"])))
    if draw(st.booleans()):
        final = {"output_tokens": draw(st.integers(0, 10**5))}
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        parts.append(
            event("message_delta", {"type": "message_delta", "delta": delta, "usage": final})
        )
        if draw(st.booleans()):
            parts.append(delta_event(draw(texts), "text_delta"))  # content after the usage
    if draw(st.booleans()):
        parts.append(event("message_stop", {"type": "message_stop"}))
    data = b"".join(parts)
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    if ending != b"\n" and draw(st.booleans()):
        data = data.replace(b"\n", ending)
    return data


def chunked(data: bytes, cuts: list[int], events: bool) -> list[bytes]:
    """Cut at the given offsets, or (``events``) at event boundaries, as the upstream sends."""
    if events:
        pieces = data.split(b"\n\n")
        return [p + b"\n\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10**6), max_size=12), st.booleans())
def test_the_meter_reads_the_same_with_the_scan(data: bytes, cuts: list[int], events: bool) -> None:
    scanning, parsing = StreamMeter(), StreamMeter()
    parsing._parser = ParseOnly()
    for chunk in chunked(data, cuts, events):
        scanning.feed(chunk)
        parsing.feed(chunk)
    assert meter_view(scanning) == meter_view(parsing)


def test_the_scan_takes_the_usual_chunks() -> None:
    meter = StreamMeter()
    meter.feed(event("message_start", {"type": "message_start", "message": {"usage": {}}}))
    parser = meter._parser
    one = delta_event("Hello", "text_delta")
    assert parser.scan_deltas(one) == [one[len(DELTA) : -2]]
    assert parser.scan_deltas(one + delta_event(" wor\nld", "text_delta")) is not None
    for bad in (
        one[:-1],  # not closed
        one + b"\n",  # an extra blank line: parse it
        one.replace(b"\n", b"\r\n"),
        one[:-2] + b"\ndata: more\n\n",  # a second data line
        one[:-2] + b"\nevent: ping\n\n",  # a second event field
        b"event: ping\ndata: {}\n\n" + one,
        one + b": comment\n\n",
    ):
        assert parser.scan_deltas(bad) is None, bad
    fresh = SSEParser()  # the first line of a stream may carry a BOM: parse it
    assert fresh.scan_deltas(one) is None


chunks = st.lists(
    st.sampled_from(
        [DELTA, b"x", b'{"a":"\\n"}', b"\n", b"\n\n", b"\r", b"\r\n", b": c", b"event: ping",
         b"data: ", b" ", b"\xef\xbb\xbf", b"event: content_block_delta"]
    ),
    max_size=12,
).map(b"".join)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(chunks, max_size=4), chunks)
@example([b": c\n"], DELTA + b'{"a":"\\n"}\n\n' + DELTA + b"x\n\n")
@example([b": c\n", DELTA], b"x\n\n")
def test_whatever_the_scan_accepts_parses_the_same(before: list[bytes], chunk: bytes) -> None:
    parser = SSEParser()
    for piece in before:
        if parser.scan_deltas(piece) is None:
            parser.feed_raw(piece)
    reference = copy.deepcopy(parser)
    scanned = parser.scan_deltas(chunk)
    if scanned is None:
        assert state(parser) == state(reference)  # nothing consumed
        return
    parsed = reference.feed_raw(chunk)
    assert parsed == [(b"content_block_delta", data) for data in scanned]
    assert state(parser) == state(reference)


def test_a_copied_parser_keeps_the_fast_scan() -> None:
    """A copy (the stream's careful path tries a chunk on one) is in the same state, the
    between-events flag included, and parses the next chunk the same way."""
    parser = SSEParser()
    parser.feed_raw(b"event: message_start\ndata: {}\n\n")
    twin = parser.copy()
    assert twin._between == parser._between
    chunk = b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
    assert twin.feed_raw(chunk) == parser.feed_raw(chunk)
