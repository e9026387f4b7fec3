"""Anthropic's list paging (``limit``, ``after_id``, ``before_id``; ``data``, ``has_more``,
``first_id``, ``last_id``) over a list that is already in its order (newest first)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from app.sandbox.common import Problem

T = TypeVar("T")


def _invalid(message: str) -> Problem:
    return 400, "invalid_request_error", message


def page(
    items: Sequence[T],
    params: Mapping[str, str],
    id_of: Callable[[T], str],
    render: Callable[[T], Any],
    *,
    max_limit: int = 1000,
) -> dict[str, Any] | Problem:
    """One page; an ``after_id``/``before_id`` that is not in ``items`` is a 400."""
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= max_limit:
        return _invalid(f"limit: Input should be between 1 and {max_limit}")
    ids = [id_of(item) for item in items]
    position = {item_id: i for i, item_id in enumerate(ids)}
    after_id, before_id = params.get("after_id"), params.get("before_id")
    if after_id is not None and before_id is not None:
        return _invalid("after_id and before_id cannot both be given")
    if after_id is not None:
        if after_id not in position:
            return _invalid(f"after_id: no object with id {after_id!r}")
        start = position[after_id] + 1
        end = min(len(items), start + limit)
        has_more = end < len(items)
    elif before_id is not None:
        if before_id not in position:
            return _invalid(f"before_id: no object with id {before_id!r}")
        end = position[before_id]
        start = max(0, end - limit)
        has_more = start > 0
    else:
        start, end = 0, min(len(items), limit)
        has_more = end < len(items)
    chosen = items[start:end]
    return {
        "data": [render(item) for item in chosen],
        "has_more": has_more,
        "first_id": ids[start] if chosen else None,
        "last_id": ids[end - 1] if chosen else None,
    }
