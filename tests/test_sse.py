"""app.relay.sse: incremental SSE parsing and stream metering, under any chunking."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.relay.sse import SSEEvent, SSEParser, StreamMeter
from billing.pricing import Usage

# The spec §2 recording (with multibyte text added to one delta).
TEXT_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_018C","type":"message",'
    b'"role":"assistant","model":"claude-haiku-4-5-20251001","content":[],"stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":706,"cache_creation_input_tokens":0,'
    b'"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,'
    b'"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}\n'
    b"\n"
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n'
    b"\n"
    b"event: ping\n"
    b'data: {"type": "ping"}\n'
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Building"}}\n'
    b"\n"
    b"event: content_block_delta\n"
    + (
        'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
        '"text":" ☃ 日本語 🎉"}}\n'
    ).encode()
    + b"\n"
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n'
    b"\n"
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"input_tokens":706,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
    b'"output_tokens":13}}\n'
    b"\n"
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n'
    b"\n"
)

# A tool_use stream with thinking, whitespace-padded JSON, a comment, an unknown event type,
# a multi-line data field and a cache breakdown with 1h writes.
TOOL_STREAM = (
    b": keep-alive comment\n"
    b"event: message_start\n"
    b'data: { "type" : "message_start", "message" : { "id" : "msg_tool", "model" : '
    b'"claude-sonnet-4-6", "content" : [ ], "usage" : { "input_tokens" : 42, '
    b'"cache_creation_input_tokens" : 1800, "cache_read_input_tokens" : 0, '
    b'"cache_creation" : { "ephemeral_5m_input_tokens" : 0, "ephemeral_1h_input_tokens" : 1800 }, '
    b'"output_tokens" : 2 } } }\n'
    b"\n"
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking",'
    b'"thinking":"","signature":""}}\n'
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
    b'"thinking":"The user wants the weather."}}\n'
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta",'
    b'"signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}\n'
    b"\n"
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n'
    b"\n"
    b"event: future_event_type\n"
    b'data: {"type":"future_event_type","whatever":[1,2,3]}\n'
    b"\n"
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
    b'"id":"toolu_01","name":"get_weather","input":{}}}\n'
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":""}}\n'
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"city\\": \\"Paris\\"}"}}\n'
    b"\n"
    b"event: content_block_stop\n"
    b"data: {\n"
    b'data: "type":"content_block_stop","index":1}\n'
    b"\n"
    b"event: message_delta\n"
    b'data: { "type" : "message_delta", "delta" : { "stop_reason" : "tool_use" }, '
    b'"usage" : { "output_tokens" : 61, "server_tool_use" : null } }\n'
    b"\n"
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n'
    b"\n"
)

CRLF_STREAM = TEXT_STREAM.replace(b"\n", b"\r\n")
CR_STREAM = TEXT_STREAM.replace(b"\n", b"\r")

STREAMS = {"text": TEXT_STREAM, "tool": TOOL_STREAM, "crlf": CRLF_STREAM, "cr": CR_STREAM}

TEXT_EVENTS = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def parse_all(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        events.extend(parser.feed(data[start:end]))
    return events


def meter_all(data: bytes, cuts: list[int]) -> StreamMeter:
    meter = StreamMeter()
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        meter.feed(data[start:end])
    return meter


def meter_state(meter: StreamMeter) -> tuple[object, ...]:
    return (
        meter.message_id,
        meter.model,
        meter.usage,
        meter.started,
        meter.stopped,
        meter.error,
        meter.delta_text_bytes,
        meter.deltas,
        meter.stop_reason,
        meter.estimated_output_tokens(),
    )


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=40)


# --- parser --------------------------------------------------------------------------------------


def test_text_stream_events() -> None:
    events = SSEParser().feed(TEXT_STREAM)
    assert [e.event for e in events] == TEXT_EVENTS
    assert all(orjson.loads(e.data)["type"] == e.event for e in events)
    assert orjson.loads(events[4].data)["delta"]["text"] == " ☃ 日本語 🎉"


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_line_endings_are_equivalent(name: str) -> None:
    expected = SSEParser().feed(TEXT_STREAM if name != "tool" else TOOL_STREAM)
    assert SSEParser().feed(STREAMS[name]) == expected


def test_byte_at_a_time() -> None:
    for data in STREAMS.values():
        parser = SSEParser()
        events = [event for i in range(len(data)) for event in parser.feed(data[i : i + 1])]
        assert events == SSEParser().feed(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.data())
def test_any_chunking_yields_the_same_events(name: str, data: st.DataObject) -> None:
    stream = STREAMS[name]
    cuts = data.draw(cuts_for(stream))
    assert parse_all(stream, cuts) == parse_all(stream, [])


def test_sse_format_details() -> None:
    parser = SSEParser()
    events = parser.feed(
        b"\xef\xbb\xbf: comment\n"  # BOM, then a comment
        b"data: one\n"
        b"data:two\n"  # no space after the colon
        b"data:  three\n"  # only one space is dropped
        b"id: 7\nretry: 100\nunknown: x\n"
        b"\n"
        b"event: named\n"
        b"data\n"  # a field with no colon: empty data line
        b"\n"
        b"event: no-data\n"
        b"\n"  # an event without data is not dispatched
        b"data: last\n"  # unterminated: kept until a blank line
    )
    assert events == [SSEEvent("message", "one\ntwo\n three"), SSEEvent("named", "")]
    assert parser.feed(b"\r\n") == [SSEEvent("message", "last")]


def test_crlf_split_across_chunks_counts_once() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [SSEEvent("message", "a")]
    # "\r" then "\r\n": two line endings
    parser = SSEParser()
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\r\n") == [SSEEvent("message", "b")]


def test_long_line_in_many_chunks() -> None:
    payload = b"x" * 100_000
    parser = SSEParser()
    out: list[SSEEvent] = []
    data = b"data: " + payload + b"\n\n"
    for i in range(0, len(data), 7):
        out.extend(parser.feed(data[i : i + 7]))
    assert out == [SSEEvent("message", payload.decode())]


# --- meter ---------------------------------------------------------------------------------------


def test_meter_text_stream() -> None:
    meter = StreamMeter()
    meter.feed(TEXT_STREAM)
    assert meter.started and meter.stopped and meter.error is None
    assert meter.message_id == "msg_018C"
    assert meter.model == "claude-haiku-4-5-20251001"
    assert meter.usage == Usage(input_tokens=706, output_tokens=13, service_tier="standard")
    assert meter.stop_reason == "end_turn"
    assert meter.deltas == 2
    assert meter.delta_text_bytes == len("Building") + len(" ☃ 日本語 🎉".encode())
    assert meter.estimated_output_tokens() == 13  # final count is authoritative
    assert meter.billable_usage() == meter.usage


def test_meter_tool_stream() -> None:
    meter = StreamMeter()
    meter.feed(TOOL_STREAM)
    assert meter.started and meter.stopped
    assert meter.message_id == "msg_tool"
    assert meter.model == "claude-sonnet-4-6"
    assert meter.usage.input_tokens == 42
    assert meter.usage.cache_write_1h_tokens == 1800
    assert meter.usage.cache_write_5m_tokens == 0
    assert meter.usage.output_tokens == 61
    assert meter.usage.web_search_requests == 0
    assert meter.stop_reason == "tool_use"
    assert meter.deltas == 4
    # thinking text + partial_json (JSON-escaped); the signature is not output text
    assert meter.delta_text_bytes == len("The user wants the weather.") + len(
        '{\\"city\\": \\"Paris\\"}'
    )


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.data())
def test_any_chunking_yields_the_same_usage(name: str, data: st.DataObject) -> None:
    stream = STREAMS[name]
    cuts = data.draw(cuts_for(stream))
    assert meter_state(meter_all(stream, cuts)) == meter_state(meter_all(stream, []))


def test_crlf_and_cr_meter_the_same() -> None:
    expected = meter_state(meter_all(TEXT_STREAM, []))
    assert meter_state(meter_all(CRLF_STREAM, [])) == expected
    assert meter_state(meter_all(CR_STREAM, [])) == expected


def test_error_mid_stream() -> None:
    cut = TEXT_STREAM.index(b"event: content_block_stop")
    stream = (
        TEXT_STREAM[:cut]
        + b"event: error\n"
        + b'data: {"type": "error", "error": {"type": "overloaded_error", '
        + b'"message": "Overloaded"}}\n\n'
    )
    meter = StreamMeter()
    meter.feed(stream)
    assert meter.started and not meter.stopped
    assert meter.error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert meter.usage.input_tokens == 706
    assert meter.usage.output_tokens == 1  # message_start's starting count
    # no final count: estimate from the deltas relayed (2 deltas, 28 bytes → 7 tokens)
    assert meter.estimated_output_tokens() == 7
    assert meter.billable_usage().output_tokens == 7
    assert meter.billable_usage().input_tokens == 706


def test_unparseable_error_event_is_still_an_error() -> None:
    meter = StreamMeter()
    meter.feed(b"event: error\ndata: not json\n\n")
    assert meter.error is not None
    assert meter.error["error"]["type"] == "api_error"


def test_deltas_after_last_usage_fall_back_to_estimate() -> None:
    meter = StreamMeter()
    meter.feed(TEXT_STREAM.split(b"event: message_stop")[0])
    assert meter.estimated_output_tokens() == 13
    delta = {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "x" * 400},
    }
    meter.feed(b"event: content_block_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
    assert meter.estimated_output_tokens() == 107  # (28 + 400) bytes / 4 > 13


def test_unnamed_events_dispatch_on_type() -> None:
    named = meter_all(TEXT_STREAM, [])
    unnamed = TEXT_STREAM.replace(b"event: ", b": was event ")
    assert meter_state(meter_all(unnamed, [])) == meter_state(named)


def test_multiple_message_deltas_overwrite() -> None:
    meter = StreamMeter()
    meter.feed(TEXT_STREAM.split(b"event: message_delta")[0])
    for output in (5, 9):
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": None},
            "usage": {"output_tokens": output},
        }
        meter.feed(b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
    assert meter.usage.output_tokens == 9
    assert meter.usage.input_tokens == 706


@pytest.mark.parametrize(
    "garbage",
    [
        b"event: message_start\ndata: {not json\n\n",
        b"event: message_start\ndata: [1,2]\n\n",
        b'event: message_start\ndata: {"message": "str"}\n\n',
        b'event: message_start\ndata: {"message": {"usage": "x", "id": 5}}\n\n',
        b'event: message_delta\ndata: {"usage": [1], "delta": 3}\n\n',
        b'event: message_delta\ndata: {"usage": {"output_tokens": "many"}}\n\n',
        b"event: content_block_delta\ndata: \xff\xfe\n\n",
        b"data: \xff\xfe garbage\n\n",
        b'data: {"type": 5}\n\n',
        b"\x00\x01\x02\n\n\n",
    ],
)
def test_garbage_never_raises(garbage: bytes) -> None:
    meter = StreamMeter()
    meter.feed(garbage)
    meter.feed(TEXT_STREAM)
    assert meter.usage.output_tokens == 13


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=500), st.lists(st.integers(0, 500), max_size=10))
def test_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    meter = meter_all(data, [c for c in cuts if c <= len(data)])
    assert meter.estimated_output_tokens() >= 0
