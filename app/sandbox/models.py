"""``GET /v1/models`` and ``GET /v1/models/{model_id}`` (the latter resolves aliases)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.sandbox.gate import Gate
from app.sandbox.validation import unknown_model


class ModelRoutes:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def list_models(self, request: Request) -> Response:
        gate = self.gate
        ex = await gate.open(request, "/v1/models")
        if isinstance(ex, Response):
            return ex
        page = gate.state.models.page(request.query_params)
        if isinstance(page, tuple):
            return gate.fail(ex, page)
        return gate.ok(ex, page)

    async def get_model(self, request: Request) -> Response:
        gate = self.gate
        model_id: str = request.path_params["model_id"]
        ex = await gate.open(request, f"/v1/models/{model_id}")
        if isinstance(ex, Response):
            return ex
        info = gate.state.models.resolve(model_id)
        if info is None:
            return gate.fail(ex, unknown_model(model_id))
        return gate.ok(ex, info.to_json())
