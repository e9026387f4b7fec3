"""Message Batches: create, list, retrieve, cancel, delete, results (wire spec §5).

A batch belongs to the credential that created it: any other credential gets 404
``not_found_error`` for its id, as for an unknown id, and never sees it in a list.

Time is scripted: a batch takes ``processing_seconds`` (``POST /_fake/batches``; 0.5 s by
default) and its lines finish one after another across that time (line *i* of *n* at
``created + seconds × (i+1)/n``). A cancel stops it: lines not finished by then are
``canceled``, the answer says ``canceling``, and the batch has ``ended`` 0.05 s later.
Results are fixed when a line finishes, deterministically:

- ``succeeded``: the reply a Messages request with these ``params`` gets (same text and token
  counts, prompt cache simulated per credential), with ``usage.service_tier: "batch"``;
- ``errored``: an unknown model (404 ``not_found_error``), ``max_tokens`` above the model's
  (400), a ``file_id`` this credential does not hold (404), or ``[batch:error]`` in the last
  user text (500 ``api_error``);
- ``expired``: ``[batch:expire]`` in the last user text; ``canceled``: see above.

Create refuses (400 ``invalid_request_error``) a body without a non-empty ``requests`` list
(at most 100,000), a ``custom_id`` that is not 1–64 of ``[A-Za-z0-9_-]`` or is repeated, and
``params`` that a Messages request would be refused for (the message names
``requests.<i>.params.<field>``), ``stream: true`` included; over 256 MB: 413. ``results_url``
names this sandbox; results are JSONL, one line per request, in request order. Delete works
only once a batch has ended (else 400); cancel only while it has not (else 400).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.sandbox.common import Problem, new_id, tokens
from app.sandbox.files import missing_file
from app.sandbox.gate import Exchange, Gate
from app.sandbox.paging import page
from app.sandbox.prompt import analyze
from app.sandbox.render import message_json
from app.sandbox.reply import content_text, plan_reply
from app.sandbox.state import FakeState
from app.sandbox.validation import check_body, check_model_limit, unknown_model

MAX_BATCH_BODY_BYTES: Final = 256 * 1024 * 1024
MAX_BATCH_REQUESTS: Final = 100_000
DEFAULT_PROCESSING_SECONDS: Final = 0.5
CANCEL_SECONDS: Final = 0.05
EXPIRES_SECONDS: Final = 24 * 3600
CUSTOM_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOO_LARGE: Final[Problem] = (
    413,
    "request_too_large",
    "Request exceeds the maximum allowed number of bytes. The maximum request size is 256 MB.",
)


def _invalid(message: str) -> Problem:
    return 400, "invalid_request_error", message


def batch_not_found(batch_id: str) -> Problem:
    return 404, "not_found_error", f"Message Batch not found: {batch_id}"


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int((ts % 1) * 1_000_000):06d}Z"


@dataclass(slots=True)
class Line:
    custom_id: str
    params: dict[str, Any]
    done_at: float
    result: dict[str, Any] | None = None  # fixed when the line finishes


@dataclass(slots=True)
class Batch:
    id: str
    credential: str
    created_at: float
    ends_at: float
    lines: list[Line]
    cancel_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def end_time(self) -> float:
        if self.cancel_at is None:
            return self.ends_at
        return min(self.ends_at, self.cancel_at + CANCEL_SECONDS)

    def ended(self, now: float) -> bool:
        return now >= self.end_time()

    def status(self, now: float) -> str:
        if self.ended(now):
            return "ended"
        return "canceling" if self.cancel_at is not None else "in_progress"


def _outcome(state: FakeState, batch: Batch, line: Line) -> dict[str, Any]:
    """The result of one finished line (see the module docstring)."""
    if batch.cancel_at is not None and line.done_at > batch.cancel_at:
        return {"type": "canceled"}
    params = line.params
    last_user: Any = None
    for message in reversed(params.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            last_user = message.get("content")
            break
    text = content_text(last_user)
    if "[batch:expire]" in text:
        return {"type": "expired"}
    problem: Problem | None = None
    info = state.models.resolve(params["model"])
    if "[batch:error]" in text:
        problem = (500, "api_error", "Internal server error")
    elif info is None:
        problem = unknown_model(params["model"])
    else:
        problem = check_model_limit(params["max_tokens"], info.max_tokens, info.id)
        problem = problem or missing_file(state.files, params, batch.credential)
    if problem is not None or info is None:
        assert problem is not None
        error = {"type": problem[1], "message": problem[2]}
        return {
            "type": "errored",
            "error": {"type": "error", "error": error, "request_id": new_id("req_011C", 20)},
        }
    prompt = analyze(params)
    body_bytes = len(orjson.dumps(params))
    total = max(1, min(tokens(prompt.chars), body_bytes))
    plan = None
    if prompt.breakpoints:
        plan = state.cache.plan(batch.credential, info.id, prompt, total)
        state.cache.commit(plan)
    cached = (plan.read + plan.written) if plan else 0
    reply = plan_reply(params)
    raw = message_json(new_id("msg_01"), info.id, reply, total - cached, plan, tier="batch")
    return {"type": "succeeded", "message": orjson.loads(raw)}


class BatchStore:
    def __init__(self) -> None:
        self.batches: dict[str, Batch] = {}
        self.processing_seconds = DEFAULT_PROCESSING_SECONDS

    def clear(self) -> None:
        self.batches.clear()
        self.processing_seconds = DEFAULT_PROCESSING_SECONDS

    def get(self, batch_id: str, credential: str) -> Batch | None:
        batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.credential == credential else None

    def of(self, credential: str) -> list[Batch]:
        mine = [b for b in self.batches.values() if b.credential == credential]
        mine.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        return mine


def _advance(state: FakeState, batch: Batch, now: float) -> None:
    """Fix the results of the lines finished (or canceled) by ``now``."""
    ended = batch.ended(now)
    for line in batch.lines:
        if line.result is None and (ended or line.done_at <= now):
            line.result = _outcome(state, batch, line)
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    for line in batch.lines:
        counts["processing" if line.result is None else line.result["type"]] += 1
    batch.counts = counts


def batch_json(state: FakeState, batch: Batch, base_url: str) -> dict[str, Any]:
    now = time.time()
    _advance(state, batch, now)
    ended = batch.ended(now)
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.status(now),
        "request_counts": dict(batch.counts),
        "ended_at": _rfc3339(batch.end_time()) if ended else None,
        "created_at": _rfc3339(batch.created_at),
        "expires_at": _rfc3339(batch.created_at + EXPIRES_SECONDS),
        "archived_at": None,
        "cancel_initiated_at": _rfc3339(batch.cancel_at),
        "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def check_requests(body: Any, version: str) -> Problem | None:
    if type(body) is not dict:
        return _invalid("The request body must be a JSON object.")
    requests = body.get("requests")
    if requests is None:
        return _invalid("requests: Field required")
    if type(requests) is not list:
        return _invalid("requests: Input should be a valid list")
    if not requests:
        return _invalid("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > MAX_BATCH_REQUESTS:
        return _invalid(f"requests: List should have at most {MAX_BATCH_REQUESTS} items")
    seen: set[str] = set()
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if type(item) is not dict:
            return _invalid(f"{where}: Input should be a valid dictionary")
        custom_id = item.get("custom_id")
        if type(custom_id) is not str:
            return _invalid(f"{where}.custom_id: Field required")
        if not CUSTOM_ID.match(custom_id):
            return _invalid(
                f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            )
        if custom_id in seen:
            return _invalid(f"Duplicate custom_id: {custom_id!r}; custom_ids must be unique")
        seen.add(custom_id)
        params = item.get("params")
        if params is None:
            return _invalid(f"{where}.params: Field required")
        problem = check_body(params, messages_endpoint=True, version=version)
        if problem is not None:
            return problem[0], problem[1], f"{where}.params.{problem[2]}"
        if params.get("stream") is True:
            return _invalid(f"{where}.params.stream: streaming is not supported in batches")
    return None


class BatchRoutes:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    @property
    def store(self) -> BatchStore:
        store: BatchStore = self.gate.state.batches
        return store

    @staticmethod
    def _base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def create(self, request: Request) -> Response:
        gate = self.gate
        raw = await request.body()
        body: Any = None
        unusable: Problem | None = None
        if len(raw) > MAX_BATCH_BODY_BYTES:
            unusable = TOO_LARGE
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                unusable = _invalid(f"The request body is not valid JSON: {exc}")
        ex = await gate.open(request, "/v1/messages/batches", body, len(raw))
        if isinstance(ex, Response):
            return ex
        problem = unusable or check_requests(body, ex.version)
        if problem is not None:
            return gate.fail(ex, problem)
        now = time.time()
        seconds = self.store.processing_seconds
        items = body["requests"]
        n = len(items)
        lines = [
            Line(item["custom_id"], item["params"], now + seconds * (i + 1) / n)
            for i, item in enumerate(items)
        ]
        batch = Batch(new_id("msgbatch_01", 24), ex.credential, now, now + seconds, lines)
        self.store.batches[batch.id] = batch
        return gate.ok(ex, batch_json(gate.state, batch, self._base(request)))

    async def list_batches(self, request: Request) -> Response:
        gate = self.gate
        ex = await gate.open(request, "/v1/messages/batches")
        if isinstance(ex, Response):
            return ex
        base = self._base(request)
        result = page(
            self.store.of(ex.credential),
            request.query_params,
            lambda b: b.id,
            lambda b: batch_json(gate.state, b, base),
        )
        if isinstance(result, tuple):
            return gate.fail(ex, result)
        return gate.ok(ex, result)

    async def _find(self, request: Request, suffix: str = "") -> Exchange | Response:
        batch_id: str = request.path_params["batch_id"]
        return await self.gate.open(request, f"/v1/messages/batches/{batch_id}{suffix}")

    def _batch(self, request: Request, ex: Exchange) -> Batch | Response:
        batch_id: str = request.path_params["batch_id"]
        batch = self.store.get(batch_id, ex.credential)
        if batch is None:
            return self.gate.fail(ex, batch_not_found(batch_id))
        return batch

    async def retrieve(self, request: Request) -> Response:
        ex = await self._find(request)
        if isinstance(ex, Response):
            return ex
        batch = self._batch(request, ex)
        if isinstance(batch, Response):
            return batch
        return self.gate.ok(ex, batch_json(self.gate.state, batch, self._base(request)))

    async def cancel(self, request: Request) -> Response:
        ex = await self._find(request, "/cancel")
        if isinstance(ex, Response):
            return ex
        batch = self._batch(request, ex)
        if isinstance(batch, Response):
            return batch
        now = time.time()
        if batch.ended(now):
            return self.gate.fail(
                ex, _invalid(f"Message Batch {batch.id} has already ended and cannot be canceled")
            )
        if batch.cancel_at is None:
            _advance(self.gate.state, batch, now)
            batch.cancel_at = now
        return self.gate.ok(ex, batch_json(self.gate.state, batch, self._base(request)))

    async def delete(self, request: Request) -> Response:
        ex = await self._find(request)
        if isinstance(ex, Response):
            return ex
        batch = self._batch(request, ex)
        if isinstance(batch, Response):
            return batch
        if not batch.ended(time.time()):
            return self.gate.fail(
                ex,
                _invalid(
                    f"Message Batch {batch.id} cannot be deleted while it is processing; "
                    "cancel it first"
                ),
            )
        del self.store.batches[batch.id]
        return self.gate.ok(ex, {"id": batch.id, "type": "message_batch_deleted"})

    async def results(self, request: Request) -> Response:
        ex = await self._find(request, "/results")
        if isinstance(ex, Response):
            return ex
        batch = self._batch(request, ex)
        if isinstance(batch, Response):
            return batch
        now = time.time()
        if not batch.ended(now):
            return self.gate.fail(
                ex,
                _invalid(f"Message Batch {batch.id} has not ended yet; its results are not ready"),
            )
        _advance(self.gate.state, batch, now)
        lines = list(batch.lines)
        ex.entry["status"] = 200

        async def body() -> AsyncIterator[bytes]:
            out = bytearray()
            for line in lines:
                out += orjson.dumps({"custom_id": line.custom_id, "result": line.result})
                out += b"\n"
                if len(out) >= 65536:
                    yield bytes(out)
                    out.clear()
            if out:
                yield bytes(out)

        headers = {"request-id": ex.request_id}
        return StreamingResponse(body(), headers=headers, media_type="application/x-jsonl")
