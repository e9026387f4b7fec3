"""The sandbox's model catalogue: what ``GET /v1/models`` lists and which names ``model`` takes.

A dated id (``claude-haiku-4-5-20251001``) and its alias (``claude-haiku-4-5``) name the same
model, as at Anthropic: an alias names the newest dated id of its family, and a reply (and
``GET /v1/models/{alias}``) names the dated id. Any other name is unknown: 404
``not_found_error`` "model: <name>". Tests may add models to one app with
``POST /_fake/models`` (see :mod:`app.sandbox.control`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from app.sandbox.common import Problem


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of ``GET /v1/models`` (sandbox values)."""

    id: str
    display_name: str
    created_at: str
    max_input_tokens: int
    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "model",
            "id": self.id,
            "display_name": self.display_name,
            "created_at": self.created_at,
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
        }


# Newest first, as Anthropic lists them.
MODELS: Final[tuple[ModelInfo, ...]] = (
    ModelInfo("claude-fable-5", "Claude Fable 5", "2026-09-30T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-sonnet-5", "Claude Sonnet 5", "2026-08-12T00:00:00Z", 1_000_000, 64_000),
    ModelInfo("claude-opus-5", "Claude Opus 5", "2026-07-24T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-opus-4-8", "Claude Opus 4.8", "2026-06-10T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", 1_000_000, 64_000),
    ModelInfo("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z", 1_000_000, 128_000),
    ModelInfo(
        "claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z", 200_000, 64_000
    ),
    ModelInfo(
        "claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", 200_000, 64_000
    ),
    ModelInfo(
        "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 200_000, 64_000
    ),
    ModelInfo(
        "claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z", 200_000, 32_000
    ),
    ModelInfo("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z", 200_000, 32_000),
    ModelInfo(
        "claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z", 200_000, 64_000
    ),
)
# alias -> the newest dated id of its family (as Anthropic resolves them)
MODEL_ALIASES: Final[Mapping[str, str]] = {
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
}


def _invalid(message: str) -> Problem:
    return 400, "invalid_request_error", message


class Catalog:
    """The models of one sandbox app: :data:`MODELS` plus any added by the control API."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.models: tuple[ModelInfo, ...] = MODELS
        self._index()

    def _index(self) -> None:
        self.by_id: dict[str, ModelInfo] = {m.id: m for m in self.models}
        self.position: dict[str, int] = {m.id: i for i, m in enumerate(self.models)}

    def add(self, info: ModelInfo) -> None:
        """Add (or replace) a model; added models are listed first (the newest)."""
        self.models = (info, *(m for m in self.models if m.id != info.id))
        self._index()

    def resolve(self, name: str) -> ModelInfo | None:
        """The model a name (dated id or alias) stands for, or None when unknown."""
        info = self.by_id.get(name)
        if info is None:
            dated = MODEL_ALIASES.get(name)
            if dated is not None:
                info = self.by_id.get(dated)
        return info

    def page(self, params: Mapping[str, str]) -> dict[str, Any] | Problem:
        """``GET /v1/models``: ``limit`` (1–1000, default 20), ``after_id``, ``before_id``."""
        models, position = self.models, self.position
        try:
            limit = int(params.get("limit", "20"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return _invalid("limit: Input should be between 1 and 1000")
        after_id, before_id = params.get("after_id"), params.get("before_id")
        if after_id is not None:
            if after_id not in position:
                return _invalid("after_id: unknown")
            start = position[after_id] + 1
            end = min(len(models), start + limit)
        elif before_id is not None:
            if before_id not in position:
                return _invalid("before_id: unknown")
            end = position[before_id]
            start = max(0, end - limit)
        else:
            start, end = 0, min(len(models), limit)
        page = models[start:end]
        return {
            "data": [m.to_json() for m in page],
            "has_more": end < len(models) if before_id is None else start > 0,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
