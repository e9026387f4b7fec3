"""The one rule for model patterns, used by accounts (``--models``) and keys
(``allowed_models``) alike.

A pattern without wildcards names a model and its dated snapshots: ``claude-haiku-4-5`` admits
``claude-haiku-4-5`` and ``claude-haiku-4-5-20251001`` (not ``claude-haiku-4-50``). A pattern
with shell wildcards (``*``, ``?``, ``[…]``) is matched whole, case-sensitively:
``claude-*-4-5*``.
"""

from __future__ import annotations

import fnmatch

_WILDCARDS = frozenset("*?[")


def model_matches(model: str, pattern: str) -> bool:
    if _WILDCARDS.intersection(pattern):
        return fnmatch.fnmatchcase(model, pattern)
    return model == pattern or model.startswith(pattern + "-")


def allows(patterns: tuple[str, ...] | list[str] | None, model: str) -> bool:
    """True when ``patterns`` is None (everything) or one of them matches ``model``."""
    return patterns is None or any(model_matches(model, p) for p in patterns)
