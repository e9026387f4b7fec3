"""The checks Anthropic makes before any work, as plain code (no pydantic on the hot path).

Each check returns None or a :data:`~app.sandbox.common.Problem` (status, error type,
message); the refusals are listed in :mod:`app.sandbox`. Unknown top-level fields, unknown
content block types and unknown fields inside known objects pass: new API fields must reach
the model, not a 400. ``null`` for an optional field counts as absent.
"""

from __future__ import annotations

from typing import Any, Final

from app.sandbox.common import Problem

# 2026-10-21 is what the 2.x Python and 1.x TypeScript SDKs send (API versioning docs).
VERSION_2026: Final = "2026-10-21"
KNOWN_VERSIONS: Final = frozenset({"2023-01-01", "2023-06-01", VERSION_2026})
# removed in 2026-10-21: any value, even the default, is a 400
SAMPLING_PARAMS: Final = ("temperature", "top_p", "top_k")
CREDENTIAL_PREFIX: Final = "sk-ant-"
ROLES: Final = frozenset({"user", "assistant", "system"})  # "system" since 2026-05 (spec §1.1)
MIN_THINKING_BUDGET: Final = 1024


def _invalid(message: str) -> Problem:
    return 400, "invalid_request_error", message


# --- headers ---------------------------------------------------------------------------------


def read_headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """(credential, ``anthropic-version``), in one pass over the raw headers.

    ``x-api-key`` wins over ``Authorization: Bearer``; repeated ``anthropic-version`` headers
    are joined with ", " (as a proxy would join them), which is not a valid version.
    """
    api_key: str | None = None
    bearer: str | None = None
    version: str | None = None
    for name, value in raw:
        if name == b"x-api-key":
            if api_key is None:
                api_key = value.decode("latin-1")
        elif name == b"authorization":
            if bearer is None and value[:7].lower() == b"bearer ":
                bearer = value[7:].decode("latin-1").strip()
        elif name == b"anthropic-version":
            text = value.decode("latin-1")
            version = text if version is None else f"{version}, {text}"
    return api_key or bearer or None, version


def check_credential(credential: str | None) -> Problem | None:
    if credential is None:
        return 401, "authentication_error", "x-api-key header is required"
    if not credential.startswith(CREDENTIAL_PREFIX):
        return 401, "authentication_error", "invalid x-api-key"
    return None


def check_version(version: str | None) -> Problem | None:
    if version is None:
        return _invalid("anthropic-version: header is required")
    if version not in KNOWN_VERSIONS:
        return _invalid(f'anthropic-version: "{version}" is not a valid version')
    return None


# --- bodies ----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is float


def _has_citations(block: dict[str, Any]) -> bool:
    """A text block with non-empty ``citations``, or a search result holding one."""
    kind = block.get("type")
    if kind == "text":
        return bool(block.get("citations"))
    if kind == "search_result":
        inner = block.get("content")
        return type(inner) is list and any(type(b) is dict and _has_citations(b) for b in inner)
    return False


def _check_2026_block(block: dict[str, Any], role: str, where: str) -> Problem | None:
    """What 2026-10-21 refuses inside messages (API versioning docs)."""
    if role == "assistant" and block.get("type") == "document":
        return _invalid(f"{where}: document blocks are not permitted in assistant messages")
    if role == "user" and _has_citations(block):
        return _invalid(f"{where}: text blocks in user messages cannot carry citations")
    return None


def _check_content(content: Any, where: str, role: str, v2026: bool) -> Problem | None:
    if type(content) is str:
        return None
    if type(content) is not list:
        return _invalid(f"{where}: Input should be a valid string or a list of content blocks")
    for j, block in enumerate(content):
        if type(block) is not dict:
            return _invalid(f"{where}.{j}: Input should be a valid dictionary")
        kind = block.get("type")
        if kind is None:
            return _invalid(f"{where}.{j}.type: Field required")
        if type(kind) is not str:
            return _invalid(f"{where}.{j}.type: Input should be a valid string")
        if kind == "text" and type(block.get("text")) is not str:
            return _invalid(f"{where}.{j}.text: Input should be a valid string")
        if v2026:
            problem = _check_2026_block(block, role, f"{where}.{j}")
            if problem is not None:
                return problem
    return None


def _check_messages(messages: Any, v2026: bool) -> Problem | None:
    if messages is None:
        return _invalid("messages: Field required")
    if type(messages) is not list:
        return _invalid("messages: Input should be a valid list")
    if not messages:
        return _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if type(message) is not dict:
            return _invalid(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role is None:
            return _invalid(f"messages.{i}.role: Field required")
        if type(role) is not str or role not in ROLES:
            return _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            return _invalid(f"messages.{i}.content: Field required")
        problem = _check_content(message["content"], f"messages.{i}.content", role, v2026)
        if problem is not None:
            return problem
    return None


def _check_system(system: Any) -> Problem | None:
    if system is None or type(system) is str:
        return None
    if type(system) is not list:
        return _invalid("system: Input should be a valid string or a list of text blocks")
    for j, block in enumerate(system):
        if type(block) is not dict:
            return _invalid(f"system.{j}: Input should be a valid dictionary")
        if block.get("type") != "text":
            return _invalid(f"system.{j}.type: Input should be 'text'")
        if type(block.get("text")) is not str:
            return _invalid(f"system.{j}.text: Input should be a valid string")
    return None


def _check_tools(tools: Any, choice: Any) -> Problem | None:
    if tools is not None:
        if type(tools) is not list:
            return _invalid("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            if type(tool) is not dict:
                return _invalid(f"tools.{i}: Input should be a valid dictionary")
    if choice is not None:
        if type(choice) is not dict:
            return _invalid("tool_choice: Input should be a valid dictionary")
        kind = choice.get("type")
        if type(kind) is not str:
            return _invalid("tool_choice.type: Field required")
        if kind == "tool" and type(choice.get("name")) is not str:
            return _invalid("tool_choice.tool.name: Field required")
    return None


def _check_options(body: dict[str, Any]) -> Problem | None:
    """Sampling parameters, metadata and stop sequences."""
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and not _is_number(value):
            return _invalid(f"{name}: Input should be a valid number")
    top_k = body.get("top_k")
    if top_k is not None and not _is_int(top_k):
        return _invalid("top_k: Input should be a valid integer")
    metadata = body.get("metadata")
    if metadata is not None:
        if type(metadata) is not dict:
            return _invalid("metadata: Input should be a valid dictionary")
        user_id = metadata.get("user_id")
        if user_id is not None and type(user_id) is not str:
            return _invalid("metadata.user_id: Input should be a valid string")
    stops = body.get("stop_sequences")
    if stops is not None and (type(stops) is not list or not all(type(s) is str for s in stops)):
        return _invalid("stop_sequences: Input should be a valid list of strings")
    return None


def _check_thinking(thinking: Any, max_tokens: int | None) -> Problem | None:
    if thinking is None:
        return None
    if type(thinking) is not dict:
        return _invalid("thinking: Input should be a valid dictionary")
    kind = thinking.get("type")
    if type(kind) is not str:
        return _invalid("thinking.type: Field required")
    if kind != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if type(budget) is not int:
        return _invalid("thinking.enabled.budget_tokens: Input should be a valid integer")
    if budget < MIN_THINKING_BUDGET:
        return _invalid(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to "
            f"{MIN_THINKING_BUDGET}"
        )
    if max_tokens is not None and max_tokens <= budget:
        return _invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
    return None


def _check_sampling(body: dict[str, Any]) -> Problem | None:
    """2026-10-21 removed the sampling parameters: present at all (even ``null``) is a 400."""
    for name in SAMPLING_PARAMS:
        if name in body:
            return _invalid(f"{name}: Extra inputs are not permitted")
    return None


def check_body(body: Any, *, messages_endpoint: bool, version: str) -> Problem | None:
    """A Messages body (``messages_endpoint``) or a count_tokens body (no ``max_tokens``),
    under the request's ``anthropic-version``."""
    if type(body) is not dict:
        return _invalid("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        return _invalid("model: Field required")
    if type(model) is not str or not model:
        return _invalid("model: Input should be a valid string")
    max_tokens: int | None = None
    if messages_endpoint:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return _invalid("max_tokens: Field required")
        if not _is_int(max_tokens):
            return _invalid("max_tokens: Input should be a valid integer")
        if max_tokens < 1:
            return _invalid("max_tokens: Input should be greater than or equal to 1")
        stream = body.get("stream")
        if stream is not None and type(stream) is not bool:
            return _invalid("stream: Input should be a valid boolean")
    v2026 = version == VERSION_2026
    if v2026 and messages_endpoint:
        problem = _check_sampling(body)
        if problem is not None:
            return problem
    return (
        _check_messages(body.get("messages"), v2026)
        or _check_system(body.get("system"))
        or _check_tools(body.get("tools"), body.get("tool_choice"))
        or _check_options(body)
        or _check_thinking(body.get("thinking"), max_tokens)
    )


def check_model_limit(max_tokens: int, limit: int, model_id: str) -> Problem | None:
    if max_tokens > limit:
        return _invalid(
            f"max_tokens: {max_tokens} > {limit}, which is the maximum allowed number of "
            f"output tokens for {model_id}"
        )
    return None


def unknown_model(name: str) -> Problem:
    return 404, "not_found_error", f"model: {name}"
