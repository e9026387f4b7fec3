"""``/v1/models``: the models a key may use.

The list comes from the upstream (``GET /v1/models`` on a pool account, cached for five
minutes), narrowed to the models this relay has a price for and the key is allowed to use. When
no account can answer, the price table stands in (ids without display metadata).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from app.relay.forward import open_upstream, read_and_release
from app.relay.service import model_matches
from app.state import Services
from billing.customers import KeyContext

log = logging.getLogger("poolrelay.models")

CACHE_SECONDS = 300.0


class ModelCatalog:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._upstream: list[dict[str, Any]] | None = None
        self._fetched_at = -1e9

    async def _upstream_models(self) -> list[dict[str, Any]]:
        if self._upstream is not None and time.monotonic() - self._fetched_at < CACHE_SECONDS:
            return self._upstream
        models: list[dict[str, Any]] = []
        try:
            opened = await open_upstream(
                self.services,
                method="GET",
                path="/v1/models",
                query="limit=1000",
                headers={"anthropic-version": "2023-06-01"},
                content=None,
                model=None,
                expected_tokens=0,
                affinity=None,
                started=time.monotonic(),
            )
            content = await read_and_release(self.services, opened)
            if opened.response.status_code == 200:
                data = orjson.loads(content)
                models = [
                    m
                    for m in data.get("data", [])
                    if isinstance(m, dict) and isinstance(m.get("id"), str)
                ]
        except Exception as exc:
            log.info(
                "could not list upstream models (%s); using the price table", type(exc).__name__
            )
        if models:
            self._upstream = models
            self._fetched_at = time.monotonic()
        return models

    async def for_key(self, key: KeyContext) -> list[dict[str, Any]]:
        book = await self.services.prices.get()
        upstream = await self._upstream_models()
        if upstream:
            candidates = [m for m in upstream if book.match(m["id"]) is not None]
        else:
            candidates = [
                {
                    "type": "model",
                    "id": model,
                    "display_name": model,
                    "created_at": "1970-01-01T00:00:00Z",
                }
                for model in sorted(book.prices)
            ]
        allowed = key.policy.allowed_models
        if allowed is not None:
            candidates = [m for m in candidates if any(model_matches(m["id"], p) for p in allowed)]
        return candidates

    @staticmethod
    def resolve(models: list[dict[str, Any]], model_id: str) -> dict[str, Any] | None:
        """The model named ``model_id``: its exact id, else the newest dated id of an alias
        (``claude-haiku-4-5`` → ``claude-haiku-4-5-20251001``), as Anthropic resolves it."""
        dated: list[dict[str, Any]] = []
        for model in models:
            if model["id"] == model_id:
                return model
            rest = model["id"][len(model_id) + 1 :]
            if model["id"].startswith(model_id + "-") and rest.isdigit():
                dated.append(model)
        return max(dated, key=lambda m: str(m["id"])) if dated else None

    @staticmethod
    def page(models: list[dict[str, Any]], params: Mapping[str, str]) -> dict[str, Any]:
        try:
            limit = max(1, min(1000, int(params.get("limit", "20"))))
        except ValueError:
            limit = 20
        after, before = params.get("after_id"), params.get("before_id")
        ids = [m["id"] for m in models]
        start, end = 0, len(models)
        if after and after in ids:
            start = ids.index(after) + 1
        if before and before in ids:
            end = ids.index(before)
            start = max(start, end - limit)
        page = models[start:end][:limit]
        return {
            "data": page,
            "has_more": start + len(page) < end,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
