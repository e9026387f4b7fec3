"""A planned reply on the wire: the Message JSON, and the SSE stream (spec §1.2, §2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.sandbox.cache import CachePlan
from app.sandbox.common import SSE_CT, Header, pause
from app.sandbox.reply import Reply

JSON_PIECE_CHARS: Final = 12

# Stream event kinds (how pacing and mid-stream errors treat them).
EV_OTHER: Final = 0
EV_DELTA: Final = 1
EV_END: Final = 2  # message_delta and message_stop

_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_JSON_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":'
)
_DELTA_TAIL: Final = b"}}\n\n"
_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
MID_STREAM_ERROR: Final = (
    b'event: error\ndata: {"type":"error","error":'
    b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


def _sse(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class SSEResponse(Response):
    """Streams pre-planned SSE events one ``send`` per event, optionally paced.

    Like Starlette's ``StreamingResponse`` fed by a generator, minus its per-response
    disconnect-listener task: a disconnect is noticed while pausing between events.
    """

    def __init__(
        self,
        events: Iterator[tuple[int, bytes]],
        headers: list[Header],
        gap: float = 0.0,
        gap_all_events: bool = False,
        error_after: int | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.body = b""
        headers.append((b"content-type", SSE_CT))
        headers.append((b"cache-control", b"no-cache"))
        self.raw_headers = headers
        self.events = events
        self.gap = gap
        self.gap_all_events = gap_all_events
        self.error_after = error_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        gap = self.gap
        error_after = self.error_after
        seen_delta = False
        for sent, (kind, data) in enumerate(self.events):
            if error_after is not None and (sent >= error_after or kind == EV_END):
                data = MID_STREAM_ERROR
                kind = EV_END
            if gap > 0:
                pace = sent > 0 if self.gap_all_events else (kind == EV_DELTA and seen_delta)
                if pace and await pause(receive, gap):
                    return
            seen_delta = seen_delta or kind == EV_DELTA
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if data is MID_STREAM_ERROR:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def usage(
    input_tokens: int,
    plan: CachePlan | None,
    output_tokens: int,
    full: bool = True,
    tier: str = "standard",
) -> dict[str, Any]:
    write_5m = plan.write_5m if plan else 0
    write_1h = plan.write_1h if plan else 0
    out: dict[str, Any] = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": plan.read if plan else 0,
    }
    if full:
        out["cache_creation"] = {
            "ephemeral_5m_input_tokens": write_5m,
            "ephemeral_1h_input_tokens": write_1h,
        }
    out["output_tokens"] = output_tokens
    if full:
        out["service_tier"] = tier
    return out


def sse_events(
    msg_id: str, model: str, reply: Reply, input_tokens: int, plan: CachePlan | None
) -> Iterator[tuple[int, bytes]]:
    start_message: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage(input_tokens, plan, 1),
    }
    yield EV_OTHER, _sse(b"message_start", {"type": "message_start", "message": start_message})
    text_block = {"type": "text", "text": ""}
    start = {"type": "content_block_start", "index": 0, "content_block": text_block}
    yield EV_OTHER, _sse(b"content_block_start", start)
    yield EV_OTHER, _PING
    for piece in reply.pieces:
        yield EV_DELTA, _DELTA_HEAD + orjson.dumps(piece) + _DELTA_TAIL
    yield EV_OTHER, _sse(b"content_block_stop", {"type": "content_block_stop", "index": 0})
    tool = reply.tool
    if tool is not None:
        block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
        start = {"type": "content_block_start", "index": 1, "content_block": block}
        yield EV_OTHER, _sse(b"content_block_start", start)
        yield EV_DELTA, _JSON_DELTA_HEAD + b'""' + _DELTA_TAIL
        text = tool.json
        for i in range(0, len(text), JSON_PIECE_CHARS):
            chunk = orjson.dumps(text[i : i + JSON_PIECE_CHARS])
            yield EV_DELTA, _JSON_DELTA_HEAD + chunk + _DELTA_TAIL
        yield EV_OTHER, _sse(b"content_block_stop", {"type": "content_block_stop", "index": 1})
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
        "usage": usage(input_tokens, plan, reply.output_tokens, full=False),
    }
    yield EV_END, _sse(b"message_delta", delta)
    yield EV_END, _MESSAGE_STOP


def message_json(
    msg_id: str,
    model: str,
    reply: Reply,
    input_tokens: int,
    plan: CachePlan | None,
    tier: str = "standard",
) -> bytes:
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(reply.pieces)}]
    if reply.tool is not None:
        tool = reply.tool
        content.append({"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input})
    return orjson.dumps(
        {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": usage(input_tokens, plan, reply.output_tokens, tier=tier),
        }
    )
