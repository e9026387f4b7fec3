"""The dialects the relay speaks at its edge: Anthropic Messages and OpenAI Chat Completions.

The relay has one code path (:class:`app.relay.service.Relay`); an :class:`Edge` only turns the
customer's request into a Messages body and the results (JSON, SSE, errors) back into the
customer's dialect. Translation itself lives in :mod:`app.relay.openai` (pure functions).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from app import errors
from app.errors import ApiError
from app.relay.openai import (
    ChatStreamTranslator,
    TranslationError,
    anthropic_error_to_openai,
    chat_to_messages,
    messages_to_chat,
    stream_include_usage,
)
from app.relay.sse import SSEParser
from app.relay.stream import StreamTransform

ANTHROPIC_VERSION = "2023-06-01"
"""The API version of every request the relay builds itself (spec §3.1: required)."""

OPENAI_DROPPED = frozenset({"content-type", "accept"})
"""Request headers of an OpenAI client that describe its own body and answer, not the
Messages request the relay sends in its place."""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise errors.invalid_request("The request body is empty; a JSON object is required.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"The request body is not valid JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.")
    return body


class Edge:
    """Anthropic Messages: the body is forwarded byte for byte unless the relay had to edit it
    (a model alias or routing rule), and answers pass through unchanged."""

    endpoint = "messages"

    def parse(self, raw: bytes) -> dict[str, Any]:
        return parse_json_object(raw)

    def forward_bytes(self, raw: bytes, body: dict[str, Any], edited: bool) -> bytes:
        return orjson.dumps(body) if edited else raw

    def upstream_headers(self, incoming: Headers) -> list[tuple[str, str]]:
        """The customer's request headers to forward (credentials and hop-by-hop headers are
        dropped later, by the pool's upstream client)."""
        return incoming.items()

    def render_error(self, err: ApiError, request_id: str | None) -> Response:
        return errors.anthropic_response(err, request_id)

    def render_json(self, status: int, headers: dict[str, str], content: bytes) -> Response:
        return Response(content, status_code=status, headers=headers)

    def stream_transform(self, body: dict[str, Any]) -> StreamTransform | None:
        return None


class OpenAIStream:
    """Anthropic SSE bytes in, ``chat.completion.chunk`` SSE bytes out."""

    def __init__(self, translator: ChatStreamTranslator) -> None:
        self._parser = SSEParser()
        self._translator = translator

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for name, data in self._parser.feed_raw(chunk):
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(payload, dict):
                out += self._translator.feed(name.decode("utf-8", "replace"), payload)
        return bytes(out)

    def fail(self, error_type: str, message: str) -> bytes:
        return self._translator.fail(message, error_type)

    def finish(self) -> bytes:
        return self._translator.finish()


class OpenAIEdge(Edge):
    """OpenAI Chat Completions, translated to Messages and back (spec §7.2)."""

    endpoint = "chat_completions"

    def __init__(self) -> None:
        self._include_usage = False

    def parse(self, raw: bytes) -> dict[str, Any]:
        body = parse_json_object(raw)
        try:
            translated = chat_to_messages(body)
        except TranslationError as exc:
            raise errors.invalid_request(exc.message) from None
        self._include_usage = stream_include_usage(body)
        return translated

    def forward_bytes(self, raw: bytes, body: dict[str, Any], edited: bool) -> bytes:
        return orjson.dumps(body)

    def upstream_headers(self, incoming: Headers) -> list[tuple[str, str]]:
        """A request the relay builds itself: it carries what Anthropic requires
        (``anthropic-version`` first among them) and nothing of OpenAI's own protocol."""
        out = [
            (name, value)
            for name, value in incoming.items()
            if name not in OPENAI_DROPPED and not name.startswith("openai-")
        ]
        if "anthropic-version" not in incoming:  # an explicit choice (extra_headers) stands
            out.append(("anthropic-version", ANTHROPIC_VERSION))
        out += [("content-type", "application/json"), ("accept", "application/json")]
        return out

    def render_error(self, err: ApiError, request_id: str | None) -> Response:
        return errors.openai_response(err, request_id)

    def render_json(self, status: int, headers: dict[str, str], content: bytes) -> Response:
        headers.pop("content-type", None)
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            data = None
        if status == 200 and isinstance(data, dict):
            out = messages_to_chat(data, created=int(time.time()))
        else:
            out = anthropic_error_to_openai(status, data if isinstance(data, dict) else content)
        return Response(
            orjson.dumps(out), status_code=status, headers=headers, media_type="application/json"
        )

    def stream_transform(self, body: dict[str, Any]) -> StreamTransform | None:
        translator = ChatStreamTranslator(
            created=int(time.time()),
            include_usage=self._include_usage,
            fallback_model=str(body.get("model", "")),
        )
        return OpenAIStream(translator)
