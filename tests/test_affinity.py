"""pool.affinity: which key ties a request to an account, and for how long."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from pool.affinity import LONG_TTL, SHORT_TTL, affinity_key

SESSION = "3f1c2a4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
EPHEMERAL = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}


def body(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}],
        "system": [{"type": "text", "text": "You are a helpful assistant. " * 20}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    base.update(extra)
    return base


def cached_body() -> dict[str, Any]:
    b = body()
    b["system"][0]["cache_control"] = dict(EPHEMERAL)
    b["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "first question"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "second question", "cache_control": dict(EPHEMERAL)},
                {"type": "text", "text": "trailing text after the breakpoint"},
            ],
        },
        {"role": "assistant", "content": "not cached yet"},
    ]
    return b


def test_nothing_to_stick_to() -> None:
    assert affinity_key(customer_id="cus_1", headers={}, body=body()) is None


def test_precedence_session_then_user_then_prefix() -> None:
    b = cached_body()
    b["metadata"] = {"user_id": "user_abc"}
    with_session = affinity_key(
        customer_id="c", headers={"x-claude-code-session-id": SESSION}, body=b
    )
    with_user = affinity_key(customer_id="c", headers={}, body=b)
    b.pop("metadata")
    with_prefix = affinity_key(customer_id="c", headers={}, body=b)
    assert with_session and with_user and with_prefix
    assert len({with_session[0], with_user[0], with_prefix[0]}) == 3
    # the session wins whatever the body says
    other_user = {**b, "metadata": {"user_id": "someone else"}}
    assert (
        affinity_key(
            customer_id="c", headers={"x-claude-code-session-id": SESSION}, body=other_user
        )
        == with_session
    )
    # the user id wins over the prefix
    changed = copy.deepcopy(b)
    changed["system"][0]["text"] = "another prompt"
    changed["metadata"] = {"user_id": "user_abc"}
    assert affinity_key(customer_id="c", headers={}, body=changed) == with_user


def test_session_header_is_case_insensitive() -> None:
    lower = affinity_key(customer_id="c", headers={"x-claude-code-session-id": SESSION}, body={})
    mixed = affinity_key(customer_id="c", headers={"X-Claude-Code-Session-Id": SESSION}, body={})
    assert lower == mixed
    assert lower is not None and lower[1] == SHORT_TTL


def test_keys_are_namespaced_per_customer_and_carry_no_user_data() -> None:
    headers = {"x-claude-code-session-id": SESSION}
    a = affinity_key(customer_id="cus_a", headers=headers, body={})
    b = affinity_key(customer_id="cus_b", headers=headers, body={})
    assert a and b and a[0] != b[0]
    for k in (a[0], b[0]):
        assert re.fullmatch(r"[0-9a-f]{32}", k)
        assert SESSION not in k
    user_a = affinity_key(customer_id="cus_a", headers={}, body={"metadata": {"user_id": "u1"}})
    user_b = affinity_key(customer_id="cus_b", headers={}, body={"metadata": {"user_id": "u1"}})
    assert user_a and user_b and user_a[0] != user_b[0]
    prefix_a = affinity_key(customer_id="cus_a", headers={}, body=cached_body())
    prefix_b = affinity_key(customer_id="cus_b", headers={}, body=cached_body())
    assert prefix_a and prefix_b and prefix_a[0] != prefix_b[0]


def test_ttl_follows_breakpoints() -> None:
    b = cached_body()
    got = affinity_key(customer_id="c", headers={}, body=b)
    assert got is not None and got[1] == SHORT_TTL
    b["system"][0]["cache_control"] = dict(HOUR)
    got = affinity_key(customer_id="c", headers={}, body=b)
    assert got is not None and got[1] == LONG_TTL
    # the TTL applies whatever the key source
    session = affinity_key(customer_id="c", headers={"x-claude-code-session-id": SESSION}, body=b)
    assert session is not None and session[1] == LONG_TTL
    top = body(cache_control=dict(HOUR))
    got = affinity_key(customer_id="c", headers={}, body=top)
    assert got is not None and got[1] == LONG_TTL


def test_prefix_hash_is_stable() -> None:
    first = affinity_key(customer_id="c", headers={}, body=cached_body())
    # same content, different key order in the JSON objects
    reordered = cached_body()
    reordered["system"][0] = dict(reversed(list(reordered["system"][0].items())))
    reordered = dict(reversed(list(reordered.items())))
    assert affinity_key(customer_id="c", headers={}, body=reordered) == first
    # fields outside tools/system/messages do not matter
    assert (
        affinity_key(
            customer_id="c", headers={}, body={**cached_body(), "max_tokens": 5, "stream": True}
        )
        == first
    )


def test_prefix_hash_ignores_what_follows_the_last_breakpoint() -> None:
    first = affinity_key(customer_id="c", headers={}, body=cached_body())
    later = cached_body()
    later["messages"][2]["content"][1]["text"] = "different trailing text"
    later["messages"][3]["content"] = "a different answer"
    later["messages"].append({"role": "user", "content": "one more turn"})
    assert affinity_key(customer_id="c", headers={}, body=later) == first


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["tools"][0].update(name="get_time"),
        lambda b: b["system"][0].update(text="another system prompt"),
        lambda b: b["system"][0]["cache_control"].update(ttl="1h"),
        lambda b: b["messages"][2]["content"][0]["cache_control"].update(ttl="1h"),
    ],
    ids=["tools", "system", "breakpoint ttl", "later breakpoint ttl"],
)
def test_prefix_hash_is_sensitive_to_the_prefix(change: Any) -> None:
    first = affinity_key(customer_id="c", headers={}, body=cached_body())
    changed = cached_body()
    change(changed)
    assert affinity_key(customer_id="c", headers={}, body=changed) != first


def test_breakpoints_in_tools_and_top_level() -> None:
    in_tools = body()
    in_tools["tools"][0]["cache_control"] = dict(EPHEMERAL)
    k1 = affinity_key(customer_id="c", headers={}, body=in_tools)
    assert k1 is not None
    # only the tools are in the prefix: the system prompt and messages may change
    other = copy.deepcopy(in_tools)
    other["system"][0]["text"] = "changed"
    other["messages"][0]["content"] = "changed"
    assert affinity_key(customer_id="c", headers={}, body=other) == k1
    # a top-level cache_control covers everything
    top = body(cache_control=dict(EPHEMERAL))
    k2 = affinity_key(customer_id="c", headers={}, body=top)
    top_other = body(
        cache_control=dict(EPHEMERAL), messages=[{"role": "user", "content": "changed"}]
    )
    assert k2 is not None and affinity_key(customer_id="c", headers={}, body=top_other) != k2


def test_user_id_must_be_a_non_empty_string() -> None:
    assert affinity_key(customer_id="c", headers={}, body=body(metadata={"user_id": ""})) is None
    assert affinity_key(customer_id="c", headers={}, body=body(metadata={"user_id": 42})) is None
    assert affinity_key(customer_id="c", headers={}, body=body(metadata="user")) is None
    assert (
        affinity_key(customer_id="c", headers={"x-claude-code-session-id": "  "}, body=body())
        is None
    )


MALFORMED: list[Any] = [
    {"messages": "not a list", "system": [{"cache_control": "yes"}]},
    {"messages": [None, 3, "x", {"content": {"cache_control": {}}}]},
    {"messages": [{"role": "user", "content": [None, {"cache_control": None}]}]},
    {"tools": {"cache_control": {"type": "ephemeral"}}, "system": 5},
    {"system": [{"type": "text", "text": "x", "cache_control": {"ttl": ["1h"]}}]},
    {"system": [{"text": float("nan"), "cache_control": {}}]},
    {"system": [{"text": object(), "cache_control": {}}]},
    {"system": [{"text": 1 << 80, "cache_control": {}}]},
    {"metadata": None, "cache_control": "auto"},
    [],
    None,
]


@pytest.mark.parametrize("malformed", MALFORMED)
def test_malformed_bodies_never_raise(malformed: Any) -> None:
    got = affinity_key(customer_id="c", headers={}, body=malformed)
    assert got is None or (isinstance(got[0], str) and got[1] in (SHORT_TTL, LONG_TTL))
    with_session = affinity_key(
        customer_id="c", headers={"x-claude-code-session-id": "s"}, body=malformed
    )
    assert with_session is not None


def conversation(turns: int, *, system_breakpoint: bool, opening: str = "first question") -> Any:
    """A conversation after ``turns`` exchanges, marked the way multi-turn clients mark it: a
    breakpoint on the latest user message (moving forward every turn), and optionally one on
    the system prompt."""
    b = body()
    if system_breakpoint:
        b["system"][0]["cache_control"] = dict(EPHEMERAL)
    messages: list[dict[str, Any]] = []
    for turn in range(turns + 1):
        text = opening if turn == 0 else f"question {turn}"
        messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        if turn < turns:
            messages.append({"role": "assistant", "content": f"answer {turn}"})
    messages[-1]["content"][-1]["cache_control"] = dict(EPHEMERAL)
    b["messages"] = messages
    return b


@pytest.mark.parametrize("system_breakpoint", [True, False], ids=["system+last", "last only"])
def test_a_conversation_keeps_its_key_as_its_breakpoint_moves(system_breakpoint: bool) -> None:
    keys = {
        affinity_key(
            customer_id="c",
            headers={},
            body=conversation(turns, system_breakpoint=system_breakpoint),
        )
        for turns in range(5)
    }
    assert len(keys) == 1 and None not in keys


def test_conversations_with_another_opening_get_another_key() -> None:
    one = affinity_key(customer_id="c", headers={}, body=conversation(2, system_breakpoint=False))
    other = affinity_key(
        customer_id="c",
        headers={},
        body=conversation(2, system_breakpoint=False, opening="another first question"),
    )
    assert one is not None and other is not None and one != other
    # with a cached system prompt, the system prompt is the shared cache: one key for both
    shared = affinity_key(customer_id="c", headers={}, body=conversation(2, system_breakpoint=True))
    assert shared == affinity_key(
        customer_id="c",
        headers={},
        body=conversation(2, system_breakpoint=True, opening="another first question"),
    )


def test_a_breakpoint_in_the_first_message_keys_on_what_precedes_it() -> None:
    """A cached document at the start of the first message, then a question that changes."""

    def asking(question: str) -> dict[str, Any]:
        b = body()
        b["messages"] = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a long document " * 50, "cache_control": EPHEMERAL},
                    {"type": "text", "text": question},
                ],
            }
        ]
        return b

    first = affinity_key(customer_id="c", headers={}, body=asking("what is it about?"))
    assert first is not None
    assert affinity_key(customer_id="c", headers={}, body=asking("who wrote it?")) == first
    changed = asking("who wrote it?")
    changed["messages"][0]["content"][0]["text"] = "another document"
    assert affinity_key(customer_id="c", headers={}, body=changed) != first
