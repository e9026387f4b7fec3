"""What the relay checks of a request before anything is held: its body's size and arrival
time, the Messages fields the relay itself relies on, the model id, and the key's right to the
model. Each refusal is an :class:`app.errors.ApiError` (Anthropic-shaped at the edge)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from app import errors, http_limits
from billing.customers import KeyContext
from pool.patterns import model_matches


async def read_body(request: Request, limit: int, seconds: float | None = None) -> bytes:
    """The request's body: at most ``limit`` bytes (413, readable by the client: the rest of
    the body is read and dropped first, within bounds), all of it within ``seconds`` (408
    ``timeout_error``, connection closed). See :mod:`app.http_limits`."""
    return await http_limits.read_body(request.receive, request.headers, limit, seconds)


MODEL_MAX_CHARS = 200
"""The longest model id the relay takes (and the request log stores)."""


def check_model_id(model: Any) -> str:
    """A model id the relay can price, log and forward: a non-empty string of at most
    ``MODEL_MAX_CHARS`` characters without NUL or control characters."""
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("model: Field required (a model id string)")
    if len(model) > MODEL_MAX_CHARS:
        raise errors.invalid_request(
            f"model: String should have at most {MODEL_MAX_CHARS} characters"
        )
    if not model.isprintable():
        raise errors.invalid_request("model: must not contain control characters")
    return model


def validate_messages_body(body: dict[str, Any]) -> None:
    check_model_id(body.get("model"))
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise errors.invalid_request("max_tokens: Field required (a positive integer)")
    if max_tokens < 1:
        raise errors.invalid_request("max_tokens: must be greater than or equal to 1")
    if not isinstance(body.get("messages"), list):
        raise errors.invalid_request("messages: Field required (a list of messages)")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise errors.invalid_request("stream: must be a boolean")


def check_model_allowed(key: KeyContext, model: str) -> None:
    allowed = key.policy.allowed_models
    if allowed is not None and not any(model_matches(model, pattern) for pattern in allowed):
        raise errors.ApiError(
            403,
            "permission_error",
            f"This API key is not allowed to use the model {model!r}.",
            {"x-should-retry": "false"},
        )
