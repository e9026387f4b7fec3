"""The control API under ``/_fake/`` (not Anthropic's; no auth; JSON in and out).

Described in :mod:`app.sandbox`. A bad control request gets 400 ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.sandbox.catalog import ModelInfo
from app.sandbox.common import json_response, next_minute
from app.sandbox.faults import FAMILIES, FAULT_KINDS, LIMIT_FIELDS, Bucket, Fault
from app.sandbox.state import REQUEST_LOG_SIZE, FakeState

# "tokens" first, so that an explicit tokens limit is not recomputed afterwards.
_LIMIT_ORDER = ("tokens", "input-tokens", "output-tokens", "requests")


def _bad(message: str) -> Response:
    return json_response({"ok": False, "error": message}, 400)


async def _body(request: Request) -> dict[str, Any] | Response:
    """A control request's JSON object, or the 400 that refuses it."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _bad("body must be JSON")
    if not isinstance(data, dict):
        return _bad("body must be a JSON object")
    return data


def _number(value: Any, name: str, *, integer: bool = False) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be a non-negative integer")
    return value


def _fault(data: dict[str, Any]) -> Fault | str:
    """The fault a ``POST /_fake/faults`` body scripts, or why it is refused."""
    kind = data.get("fault")
    if kind not in FAULT_KINDS:
        return f"fault must be one of {sorted(FAULT_KINDS)}"
    paths = data.get("paths", "messages")
    if paths not in (None, "messages", "all"):
        return "paths must be 'messages' or 'all'"
    try:
        times = _number(data.get("times"), "times", integer=True)
        retry_after = _number(data.get("retry_after"), "retry_after")
        delay = _number(data.get("delay"), "delay")
        after_events = _number(data.get("after_events"), "after_events", integer=True)
    except ValueError as exc:
        return str(exc)
    if times is not None and times < 1:
        return "times must be at least 1 (or null)"
    status = data.get("status", 500)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        return "status must be an integer from 400 to 599"
    error_type = data.get("error_type", "api_error")
    message = data.get("message", "Scripted error")
    if not isinstance(error_type, str) or not isinstance(message, str):
        return "error_type and message must be strings"
    return Fault(
        kind=str(kind),
        times=None if times is None else int(times),
        retry_after=30.0 if retry_after is None else float(retry_after),
        delay=None if delay is None else float(delay),
        after_events=4 if after_events is None else int(after_events),
        all_paths=paths == "all",
        status=status,
        error_type=error_type,
        message=message,
    )


class ControlRoutes:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    async def set_fault(self, request: Request) -> Response:
        data = await _body(request)
        if isinstance(data, Response):
            return data
        key = data.get("key")
        if not isinstance(key, str) or not key:
            return _bad("key must be a credential or '*'")
        fault = _fault(data)
        if isinstance(fault, str):
            return _bad(fault)
        self.state.faults[key] = fault
        return json_response({"ok": True})

    async def list_faults(self, request: Request) -> Response:
        return json_response({"faults": {k: f.to_json() for k, f in self.state.faults.items()}})

    async def clear_faults(self, request: Request) -> Response:
        key = request.query_params.get("key")
        if key is None:
            self.state.faults.clear()
        else:
            self.state.faults.pop(key, None)
        return json_response({"ok": True})

    async def set_limits(self, request: Request) -> Response:
        data = await _body(request)
        if isinstance(data, Response):
            return data
        key = data.get("key")
        if not isinstance(key, str) or not key:
            return _bad("key must be a credential or '*'")
        limits: dict[str, int] = {}
        remaining: dict[str, int] = {}
        try:
            for field_name, family in LIMIT_FIELDS.items():
                value = _number(data.get(field_name), field_name, integer=True)
                if value is not None:
                    limits[family] = int(value)
            raw_remaining = data.get("remaining") or {}
            if not isinstance(raw_remaining, dict):
                raise ValueError("remaining must be an object")
            for name, value in raw_remaining.items():
                family = str(name).replace("_", "-")
                if family not in FAMILIES:
                    raise ValueError(f"remaining: unknown family {name!r}")
                number = _number(value, f"remaining.{name}", integer=True)
                if number is not None:
                    remaining[family] = int(number)
            reset_in = _number(data.get("reset_in"), "reset_in")
        except ValueError as exc:
            return _bad(str(exc))

        state = self.state
        now = time.time()
        if key == "*":
            targets = list(state.buckets.values())
            probe = Bucket(state.default_limits, state.default_tokens_explicit, now)
            for family in _LIMIT_ORDER:
                if family in limits:
                    probe.set_limit(family, limits[family])
            state.default_limits = dict(probe.limits)
            state.default_tokens_explicit = probe.tokens_explicit
        else:
            targets = [state.bucket(key, now)]
        for bucket in targets:
            for family in _LIMIT_ORDER:
                if family in limits:
                    bucket.set_limit(family, limits[family])
            if remaining or reset_in is not None:
                bucket.remaining.update(remaining)
                if reset_in is not None:
                    bucket.reset_at = int(now + float(reset_in) + 0.999)
                else:
                    bucket.reset_at = next_minute(now + 30)
        if key == "*":
            return json_response({"ok": True, "limits": dict(state.default_limits)})
        return json_response({"ok": True, **targets[0].to_json()})

    async def add_model(self, request: Request) -> Response:
        data = await _body(request)
        if isinstance(data, Response):
            return data
        model_id = data.get("id")
        if not isinstance(model_id, str) or not model_id or "/" in model_id:
            return _bad("id must be a model id")
        display_name = data.get("display_name", model_id)
        created_at = data.get("created_at", time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime()))
        if not isinstance(display_name, str) or not isinstance(created_at, str):
            return _bad("display_name and created_at must be strings")
        try:
            max_tokens = _number(data.get("max_tokens", 64_000), "max_tokens", integer=True)
            max_input = _number(
                data.get("max_input_tokens", 200_000), "max_input_tokens", integer=True
            )
        except ValueError as exc:
            return _bad(str(exc))
        if not max_tokens or not max_input:
            return _bad("max_tokens and max_input_tokens must be at least 1")
        info = ModelInfo(model_id, display_name, created_at, int(max_input), int(max_tokens))
        self.state.models.add(info)
        return json_response({"ok": True, "model": info.to_json()})

    async def set_batches(self, request: Request) -> Response:
        """``{"processing_seconds": s}``: how long batches created from now on take."""
        data = await _body(request)
        if isinstance(data, Response):
            return data
        try:
            seconds = _number(data.get("processing_seconds"), "processing_seconds")
        except ValueError as exc:
            return _bad(str(exc))
        if seconds is not None:
            self.state.batches.processing_seconds = float(seconds)
        return json_response(
            {"ok": True, "processing_seconds": self.state.batches.processing_seconds}
        )

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return json_response({"ok": True})

    async def stats(self, request: Request) -> Response:
        state = self.state
        return json_response(
            {
                "requests": dict(state.requests_by_key),
                "total": state.total,
                "by_path": dict(state.by_path),
            }
        )

    async def requests(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            return _bad("limit must be an integer")
        limit = max(0, min(limit, REQUEST_LOG_SIZE))
        log = list(self.state.log)
        return json_response(log[len(log) - limit :] if limit else [])
