"""The sandbox app: routes wired to their handlers, and :func:`run` (uvicorn)."""

from __future__ import annotations

import importlib.util

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.sandbox.batches import BatchRoutes
from app.sandbox.control import ControlRoutes
from app.sandbox.files import FileRoutes
from app.sandbox.gate import Gate
from app.sandbox.messages import MessageRoutes
from app.sandbox.models import ModelRoutes
from app.sandbox.state import FakeState


def create_fake_app() -> Starlette:
    """A new sandbox app with its own :class:`FakeState` (``app.state.fake``)."""
    state = FakeState()
    gate = Gate(state)
    messages = MessageRoutes(gate)
    models = ModelRoutes(gate)
    control = ControlRoutes(state)
    batches = BatchRoutes(gate)
    files = FileRoutes(gate)
    routes = [
        Route("/v1/messages", messages.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
        Route("/v1/messages/batches", batches.create, methods=["POST"]),
        Route("/v1/messages/batches", batches.list_batches, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", batches.retrieve, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", batches.delete, methods=["DELETE"]),
        Route("/v1/messages/batches/{batch_id}/cancel", batches.cancel, methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", batches.results, methods=["GET"]),
        Route("/v1/files", files.upload, methods=["POST"]),
        Route("/v1/files", files.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", files.metadata, methods=["GET"]),
        Route("/v1/files/{file_id}", files.delete, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", files.content, methods=["GET"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
        Route("/_fake/faults", control.set_fault, methods=["POST"]),
        Route("/_fake/faults", control.list_faults, methods=["GET"]),
        Route("/_fake/faults", control.clear_faults, methods=["DELETE"]),
        Route("/_fake/limits", control.set_limits, methods=["POST"]),
        Route("/_fake/models", control.add_model, methods=["POST"]),
        Route("/_fake/batches", control.set_batches, methods=["POST"]),
        Route("/_fake/reset", control.reset, methods=["POST"]),
        Route("/_fake/stats", control.stats, methods=["GET"]),
        Route("/_fake/requests", control.requests, methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return gate.not_found(exc.status_code if isinstance(exc, HTTPException) else 404)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.fake = state
    return app


def get_state(app: Starlette) -> FakeState:
    """The :class:`FakeState` of an app made by :func:`create_fake_app`."""
    state = app.state.fake
    assert isinstance(state, FakeState)
    return state


def run(host: str = "127.0.0.1", port: int = 8081) -> None:
    """Serve a sandbox with uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    uvicorn.run(
        create_fake_app(),
        host=host,
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
