"""app.sandbox under ``anthropic-version: 2026-10-21`` (what the 2.x Python and 1.x TypeScript SDKs
send): what that version refuses on top of 2023-06-01, and what it still takes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.sandbox.helpers import KEY, assert_error, body, post

pytestmark = pytest.mark.anyio

COUNT = "/v1/messages/count_tokens"


def _content(*blocks: Any) -> dict[str, Any]:
    return body(messages=[{"role": "user", "content": list(blocks)}])


# anthropic-version: 2026-10-21
# --------------------------------------------------------------------------------------------

V2026 = {"x-api-key": KEY, "anthropic-version": "2026-10-21"}
CITED = {
    "type": "text",
    "text": "quoted",
    "citations": [{"type": "char_location", "cited_text": "q", "document_index": 0}],
}
DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k"])
async def test_2026_refuses_sampling_parameters(client: httpx.AsyncClient, name: str) -> None:
    for value in (1.0, 1, None):
        r = await post(client, body(**{name: value}), headers=V2026)
        assert_error(r, 400, "invalid_request_error", f"{name}: Extra inputs are not permitted")
    assert (await post(client, body(**{name: 1}))).status_code == 200  # 2023-06-01 takes them


async def test_2026_refuses_documents_from_the_assistant(client: httpx.AsyncClient) -> None:
    payload = body(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [DOCUMENT]},
        ]
    )
    message = "messages.1.content.0: document blocks are not permitted in assistant messages"
    for path in ("/v1/messages", COUNT):
        r = await post(client, payload, headers=V2026, path=path)
        assert_error(r, 400, "invalid_request_error", message)
        assert (await post(client, payload, path=path)).status_code == 200
    user_document = body(messages=[{"role": "user", "content": [DOCUMENT]}])
    assert (await post(client, user_document, headers=V2026)).status_code == 200


async def test_2026_refuses_citations_from_the_user(client: httpx.AsyncClient) -> None:
    message = "messages.0.content.0: text blocks in user messages cannot carry citations"
    search = {"type": "search_result", "source": "s", "title": "t", "content": [CITED]}
    for block in (CITED, search):
        payload = _content(block)
        r = await post(client, payload, headers=V2026)
        assert_error(r, 400, "invalid_request_error", message)
        assert (await post(client, payload)).status_code == 200
    uncited = _content({**CITED, "citations": []}, {**CITED, "citations": None})
    assert (await post(client, uncited, headers=V2026)).status_code == 200
    assistant = body(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [CITED]},
        ]
    )
    assert (await post(client, assistant, headers=V2026)).status_code == 200
