"""The pool end to end: the real ``anthropic`` SDK → relay → fake upstream, with 2–5 accounts.

Failover hides every account fault from the customer, quarantines the account with the right
reason and sends it nothing more; requests the upstream rejects on their merits come back as
they are; the pool's own 429 / 529; the health probe; least-loaded scheduling; the concurrency
cap; affinity; operator control. Runs on the embedded defaults and on PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import ACCOUNT_FIELDS, FakeUpstream, RelayServer, eventually
from workers.tasks import probe_accounts

MODEL = "claude-haiku-4-5"
KEY_A = "sk-ant-api03-pool-aaaa-000000000001"
KEY_B = "sk-ant-api03-pool-bbbb-000000000002"
KEY_C = "sk-ant-api03-pool-cccc-000000000003"


# --- helpers ----------------------------------------------------------------------------------


def sdk(relay: RelayServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=relay.url, max_retries=0, timeout=60)


def ask(
    client: anthropic.Anthropic,
    *,
    stream: bool = False,
    text: str = "Hello pool",
    max_tokens: int = 32,
    **kwargs: Any,
) -> str:
    """One request; returns the reply text (raises the SDK's exception on an error)."""
    messages: Any = kwargs.pop("messages", [{"role": "user", "content": text}])
    if stream:
        with client.messages.stream(
            model=MODEL, max_tokens=max_tokens, messages=messages, **kwargs
        ) as s:
            reply = "".join(s.text_stream)
            final = s.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens")
        return reply
    message = client.messages.create(
        model=MODEL, max_tokens=max_tokens, messages=messages, **kwargs
    )
    assert message.type == "message"
    return "".join(b.text for b in message.content if b.type == "text")


def accounts(relay: RelayServer) -> dict[str, dict[str, Any]]:
    with relay.admin() as admin:
        items = admin.get("/admin/accounts").raise_for_status().json()["items"]
    return {item["name"]: item for item in items}


def last_credential(fake: FakeUpstream) -> str | None:
    """The credential of the most recent ``POST /v1/messages`` the fake received."""
    for entry in reversed(fake.requests(limit=20)):
        if entry["path"] == "/v1/messages":
            return entry["credential"]  # type: ignore[no-any-return]
    return None


def counts(fake: FakeUpstream, *keys: str) -> tuple[int, ...]:
    stats = fake.stats()["requests"]
    return tuple(int(stats.get(k, 0)) for k in keys)


# --- failover, one fault kind at a time -------------------------------------------------------

# fault kind -> quarantine reason (None: retried elsewhere, never quarantined)
FAULTS = {
    "rate_limit": "rate_limited",
    "unauthorized": "credential_invalid",
    "forbidden": "permission_denied",
    "no_credit": "upstream_billing",
    "server_error": "upstream_errors",
    "disconnect": "upstream_errors",  # a connection error counts like a 5xx
    "overloaded": None,
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_failover_hides_the_fault_and_quarantines_the_account(
    relay: RelayServer, fake: FakeUpstream, kind: str
) -> None:
    # A bad account weighs more, so the scheduler tries it first while it is in service.
    relay.add_account("bad-json", KEY_A, fake.url, weight=3)
    relay.add_account("good", KEY_B, fake.url)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, kind)
    reason = FAULTS[kind]
    # The circuit breaker trips on the 3rd failure within its window; the others at once.
    tries = 3 if reason == "upstream_errors" else 1

    def check_quarantined(name: str) -> None:
        bad = accounts(relay)[name]
        if reason is None:
            assert bad["status"] == "active" and bad["quarantine_reason"] is None
        else:
            assert bad["status"] == "quarantined"
            assert bad["quarantine_reason"] == reason
            assert bad["last_error"]
            if reason in ("rate_limited", "upstream_errors"):
                assert bad["quarantined_until"] is not None

    started = time.monotonic()
    with sdk(relay, key) as client:
        for i in range(tries):  # JSON: the fault comes before any byte, the customer sees 200
            assert "failover" in ask(client, text=f"failover {i}")
        assert counts(fake, KEY_A, KEY_B) == (tries, tries)
        check_quarantined("bad-json")

        # Streaming: a second bad account (preferred over the first one too)
        relay.add_account("bad-stream", KEY_C, fake.url, weight=5)
        fake.fault(KEY_C, kind)
        for i in range(tries):
            assert "failover" in ask(client, stream=True, text=f"failover stream {i}")
        check_quarantined("bad-stream")
        assert accounts(relay)["good"]["status"] == "active"

        after = 3
        for i in range(after):
            ask(client, stream=i % 2 == 1, text=f"after {i}")
        a, c, b = counts(fake, KEY_A, KEY_C, KEY_B)
        if reason is None:
            # 529: both stay in service, but are passed over for a backoff (2 s, doubling
            # while 529s continue), so later requests go to the good account without paying
            # a failed round trip first (issue 13, item 3)
            assert b == 2 + after
            assert a + c <= 2 + 2 * after
            if time.monotonic() - started < 2.0:  # within the first backoff
                assert (a, c) == (1, 1)
            assert accounts(relay)["bad-json"]["status"] == "active"
        else:
            assert (a, c) == (tries, tries), "a quarantined account received traffic"
            assert b == 2 * tries + after
    # Only successes were charged: one debit per customer request, none for failed attempts.
    customer = relay.customer(customer_id)
    assert customer["held_usd"] == "0.000000"
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 2 * tries + after


def test_requests_rejected_on_their_merits_go_back_as_they_are(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    customer_id, key = relay.create_customer(balance_usd="5")
    with sdk(relay, key) as client:
        # The relay's own checks pass (messages is a list); the upstream refuses the body.
        for messages, needle, stream in (
            ([], "at least one message", False),
            ([], "at least one message", True),
            ([{"role": "robot", "content": "hi"}], "role", False),
        ):
            before = fake.stats()["total"]
            with pytest.raises(anthropic.BadRequestError) as caught:
                client.messages.create(model=MODEL, max_tokens=16, messages=messages, stream=stream)
            error = caught.value
            assert error.status_code == 400
            body = error.response.json()
            assert body["type"] == "error"
            assert body["error"]["type"] == "invalid_request_error"
            assert needle in body["error"]["message"]
            assert error.response.headers["request-id"].startswith("req_")
            assert fake.stats()["total"] == before + 1, "a customer error was failed over"
        # Any other 4xx, e.g. a 404 for a model this upstream does not know, is the request's.
        for credential in (KEY_A, KEY_B):
            fake.fault(
                credential, "error", status=404, error_type="not_found_error", message="model: x"
            )
        before = fake.stats()["total"]
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(
                model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.response.json()["error"] == {
            "type": "not_found_error",
            "message": "model: x",
        }
        assert fake.stats()["total"] == before + 1, "a customer error was failed over"
    view = accounts(relay)
    assert {v["status"] for v in view.values()} == {"active"}
    assert {v["quarantine_reason"] for v in view.values()} == {None}
    assert relay.customer(customer_id)["held_usd"] == "0.000000"
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["topup"]


# --- when the pool cannot serve ---------------------------------------------------------------


def test_every_account_rate_limited_is_a_429_with_retry_after(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "rate_limit", retry_after=7)
    fake.fault(KEY_B, "rate_limit", retry_after=20)
    with sdk(relay, key) as client:
        with pytest.raises(anthropic.RateLimitError) as caught:
            ask(client)
        first = caught.value.response
        assert counts(fake, KEY_A, KEY_B) == (1, 1)
        assert first.json()["error"]["type"] == "rate_limit_error"
        assert 5 <= int(first.headers["retry-after"]) <= 7  # until the first account frees up
        assert first.headers.get("x-should-retry") == "true"
        # now both are quarantined: refused at once, no upstream call
        with pytest.raises(anthropic.RateLimitError) as caught:
            ask(client, stream=True)
        assert 4 <= int(caught.value.response.headers["retry-after"]) <= 7
        assert counts(fake, KEY_A, KEY_B) == (1, 1)
    view = accounts(relay)
    assert view["a"]["quarantine_reason"] == view["b"]["quarantine_reason"] == "rate_limited"


@pytest.mark.parametrize("limited_before", [False, True], ids=["in_this_request", "earlier"])
def test_rate_limited_and_revoked_is_a_429_whatever_the_order(
    relay: RelayServer, fake: FakeUpstream, limited_before: bool
) -> None:
    """A pool whose only servable account is rate limited answers 429 with retry-after, on the
    request that finds it out by failing over as on the next one (not 529, then 429)."""
    relay.add_account("limited", KEY_A, fake.url, weight=3)
    relay.add_account("revoked", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    with sdk(relay, key) as client:
        if limited_before:
            fake.fault(KEY_A, "rate_limit", retry_after=7, times=1)
            ask(client)  # limited → revoked (still fine then)
            assert counts(fake, KEY_A, KEY_B) == (1, 1)
            fake.fault(KEY_B, "unauthorized")
        else:
            fake.fault(KEY_A, "rate_limit", retry_after=7)
            fake.fault(KEY_B, "unauthorized")
        for _ in range(2):
            with pytest.raises(anthropic.RateLimitError) as caught:
                ask(client)
            response = caught.value.response
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert 4 <= int(response.headers["retry-after"]) <= 7
    assert counts(fake, KEY_A, KEY_B) == (1, 2 if limited_before else 1)
    view = accounts(relay)
    assert view["limited"]["quarantine_reason"] == "rate_limited"
    assert view["revoked"]["quarantine_reason"] == "credential_invalid"


def test_nothing_servable_is_a_529(relay: RelayServer, fake: FakeUpstream) -> None:
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "unauthorized")
    fake.fault(KEY_B, "forbidden")
    with sdk(relay, key) as client:
        for stream in (False, True):
            with pytest.raises(anthropic.APIStatusError) as caught:
                ask(client, stream=stream)
            assert caught.value.status_code == 529
            assert caught.value.response.json()["error"]["type"] == "overloaded_error"
    assert counts(fake, KEY_A, KEY_B) == (1, 1)  # the second request found nobody to try
    view = accounts(relay)
    assert view["a"]["quarantine_reason"] == "credential_invalid"
    assert view["b"]["quarantine_reason"] == "permission_denied"
    assert relay.customer(customer_id)["held_usd"] == "0.000000"
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["topup"]


@pytest.mark.parametrize("max_attempts", [3, 2])
def test_max_attempts_is_respected(
    start_relay: Callable[..., RelayServer], fake: FakeUpstream, max_attempts: int
) -> None:
    relay = start_relay(max_attempts=max_attempts)
    keys = [f"sk-ant-api03-pool-many-00000000000{i}" for i in range(5)]
    for i, credential in enumerate(keys):
        relay.add_account(f"acct{i}", credential, fake.url)
        # a 5xx quarantines only on the 3rd in a row: every request could try all 5 accounts
        fake.fault(credential, "server_error")
    _customer_id, key = relay.create_customer(balance_usd="5")
    with sdk(relay, key) as client:
        for n in (1, 2):
            with pytest.raises(anthropic.APIStatusError) as caught:
                ask(client, stream=n == 2)
            assert caught.value.status_code == 529
            assert caught.value.response.json()["error"]["type"] == "overloaded_error"
            assert fake.stats()["total"] == n * max_attempts
    # each attempt of one request went to a different account
    used = [e["credential"] for e in fake.requests(limit=max_attempts)]
    assert len(set(used)) == max_attempts


def test_rate_limited_quarantine_ends_by_itself(relay: RelayServer, fake: FakeUpstream) -> None:
    relay.add_account("a", KEY_A, fake.url, weight=3)
    relay.add_account("b", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "rate_limit", retry_after=1, times=1)
    with sdk(relay, key) as client:
        ask(client)
        assert counts(fake, KEY_A, KEY_B) == (1, 1)
        assert accounts(relay)["a"]["quarantine_reason"] == "rate_limited"
        ask(client)
        assert counts(fake, KEY_A, KEY_B) == (1, 2)
        assert eventually(lambda: accounts(relay)["a"]["status"] == "active", timeout=5, step=0.1)
        time.sleep(1.3)  # past the requests bucket's reset the 429 reported, too
        ask(client)
        assert counts(fake, KEY_A, KEY_B) == (2, 2), "the account did not come back"


# --- health probes ----------------------------------------------------------------------------


def test_health_probe_returns_a_fixed_account_and_keeps_a_broken_one(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("broken", KEY_A, fake.url, weight=3)
    relay.add_account("fixed", KEY_C, fake.url, weight=2)
    relay.add_account("good", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "unauthorized", paths="all")  # the probe fails too
    fake.fault(KEY_C, "unauthorized")
    services = relay.services

    def probe() -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = relay.call(lambda: probe_accounts({"services": services}))
        return result

    with sdk(relay, key) as client:
        ask(client)  # broken → fixed → good
        assert counts(fake, KEY_A, KEY_C, KEY_B) == (1, 1, 1)
        view = accounts(relay)
        assert view["broken"]["quarantine_reason"] == "credential_invalid"
        assert view["fixed"]["quarantine_reason"] == "credential_invalid"

        fake.control("DELETE", "faults", params={"key": KEY_C})  # the operator fixed one
        seen = len(fake.requests(limit=200))
        results = {r["account_id"]: r["ok"] for r in probe()}
        assert results == {view["broken"]["id"]: False, view["fixed"]["id"]: True}
        probes = fake.requests(limit=200)[seen:]
        # a probe is a free call, never a billed message
        assert probes and all(p["method"] == "GET" and p["path"] == "/v1/models" for p in probes)
        assert sorted(p["credential"] for p in probes) == sorted([KEY_A, KEY_C])
        assert counts(fake, KEY_A, KEY_C, KEY_B) == (1, 1, 1)

        view = accounts(relay)
        assert view["fixed"]["status"] == "active"
        assert view["fixed"]["quarantine_reason"] is None
        assert view["broken"]["status"] == "quarantined"
        assert view["broken"]["quarantine_reason"] == "credential_invalid"
        assert view["broken"]["last_error"]

        # a second run right away backs off the broken account: no upstream call at all
        seen = fake.stats()["by_path"].get("/v1/models", 0)
        assert probe() == []
        assert fake.stats()["by_path"].get("/v1/models", 0) == seen

        ask(client)  # the fixed account (weight 2) is back in service
        assert counts(fake, KEY_A, KEY_C, KEY_B) == (1, 2, 1)


# --- scheduling -------------------------------------------------------------------------------


def test_least_loaded_account_gets_the_traffic(relay: RelayServer, fake: FakeUpstream) -> None:
    relay.add_account("tight", KEY_A, fake.url)
    relay.add_account("roomy", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.limits(KEY_A, remaining={"requests": 100})  # 100 of 4,000 left
    with sdk(relay, key) as client:
        for i in range(30):
            ask(client, text=f"load {i}", max_tokens=8)
    tight, roomy = counts(fake, KEY_A, KEY_B)
    assert tight + roomy == 30
    assert roomy >= 24, f"roomy got {roomy} of 30 (at least 80 % expected)"
    headroom = accounts(relay)["tight"]["headroom"]
    assert headroom["requests"]["limit"] == 4000
    assert headroom["requests"]["remaining"] <= 100
    assert headroom["requests"]["reset"]
    assert {"requests", "input-tokens", "output-tokens"} <= set(headroom)


def test_concurrency_cap_sends_the_overflow_elsewhere(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    # "capped" is preferred (weight) but takes one request at a time; its streams are slow.
    relay.add_account("capped", KEY_A, fake.url, weight=3, max_concurrency=1)
    relay.add_account("wide", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow", delay=1.0)
    peak: list[int] = []

    async def main() -> list[str]:
        async with anthropic.AsyncAnthropic(
            api_key=key, base_url=relay.url, max_retries=0, timeout=60
        ) as client:

            async def one(i: int) -> str:
                async with client.messages.stream(
                    model=MODEL,
                    max_tokens=2,
                    messages=[{"role": "user", "content": f"reply with 2 words {i}"}],
                ) as s:
                    return "".join([t async for t in s.text_stream])

            async def watch(done: asyncio.Event) -> None:
                async with httpx.AsyncClient(
                    base_url=relay.url, headers={"authorization": "Bearer test-admin-token"}
                ) as admin:
                    while not done.is_set():
                        items = (await admin.get("/admin/accounts")).json()["items"]
                        peak.extend(i["in_flight"] for i in items if i["name"] == "capped")
                        await asyncio.sleep(0.05)

            done = asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            replies = await asyncio.gather(*(one(i) for i in range(6)))
            done.set()
            await watcher
            return list(replies)

    replies = asyncio.run(main())
    assert len(replies) == 6 and all(replies)
    assert counts(fake, KEY_A, KEY_B) == (1, 5)
    assert peak and max(peak) <= 1


# --- affinity ---------------------------------------------------------------------------------


def three_accounts(relay: RelayServer, fake: FakeUpstream) -> None:
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    relay.add_account("c", KEY_C, fake.url)


def test_requests_without_an_affinity_key_spread(relay: RelayServer, fake: FakeUpstream) -> None:
    three_accounts(relay, fake)
    _customer_id, key = relay.create_customer(balance_usd="5")
    served: list[str | None] = []
    with sdk(relay, key) as client:
        for i in range(6):
            ask(client, text=f"no key {i}", max_tokens=8)
            served.append(last_credential(fake))
    # an account never seen has all its headroom: the first three go to three accounts
    assert sorted(served[:3]) == sorted([KEY_A, KEY_B, KEY_C])
    assert len(set(served)) == 3


@pytest.mark.parametrize(
    "source", ["session_header", "metadata_user_id", "cache_prefix", "moving_breakpoint"]
)
def test_affinity_keeps_a_conversation_on_one_account(
    relay: RelayServer, fake: FakeUpstream, source: str
) -> None:
    three_accounts(relay, fake)
    _customer_id, key = relay.create_customer(balance_usd="5")

    def conversation(name: str, turn: int) -> dict[str, Any]:
        text = f"turn {turn} of {name}"
        if source == "session_header":
            return {"text": text, "extra_headers": {"X-Claude-Code-Session-Id": f"sess-{name}"}}
        if source == "metadata_user_id":
            return {"text": text, "metadata": {"user_id": f"user-{name}"}}
        if source == "moving_breakpoint":
            # A growing conversation that marks only its latest user message, as multi-turn
            # clients do: the breakpoint moves forward every turn.
            messages: list[dict[str, Any]] = []
            for t in range(turn + 1):
                opening = f"Let us talk about {name}. " * 20 if t == 0 else f"and then {t}?"
                messages.append({"role": "user", "content": [{"type": "text", "text": opening}]})
                if t < turn:
                    messages.append({"role": "assistant", "content": f"answer {t}"})
            messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
            return {"messages": messages}
        return {
            "system": [
                {
                    "type": "text",
                    "text": f"You are the assistant of conversation {name}. " * 20,
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            "messages": [{"role": "user", "content": text}],
        }

    with sdk(relay, key) as client:
        first: list[str | None] = []
        for turn in range(5):
            ask(client, max_tokens=8, **conversation("one", turn))
            first.append(last_credential(fake))
        assert len(set(first)) == 1, f"session one moved: {first}"
        second: list[str | None] = []
        for turn in range(3):
            ask(client, max_tokens=8, **conversation("two", turn))
            second.append(last_credential(fake))
        assert len(set(second)) == 1, f"session two moved: {second}"
        # the least-used account took the new conversation
        assert second[0] != first[0]
        # and the first one is still where it was
        ask(client, max_tokens=8, **conversation("one", 9))
        assert last_credential(fake) == first[0]


def test_affinity_moves_within_the_group_when_the_account_is_quarantined(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("ws1-a", KEY_A, fake.url, group="ws1")
    relay.add_account("ws1-b", KEY_B, fake.url, group="ws1")
    _customer_id, key = relay.create_customer(balance_usd="5")
    session = {"extra_headers": {"X-Claude-Code-Session-Id": "sess-grouped"}}
    with sdk(relay, key) as client:
        ask(client, max_tokens=8, **session)
        sticky = last_credential(fake)
        other = KEY_B if sticky == KEY_A else KEY_A
        # a roomier account of another workspace joins; the session stays where it is
        relay.add_account("ws2-c", KEY_C, fake.url, group="ws2", weight=5)
        for _ in range(2):
            ask(client, max_tokens=8, **session)
            assert last_credential(fake) == sticky
        fake.fault(sticky or "", "unauthorized")
        ask(client, max_tokens=8, **session)  # fails over, invisibly
        assert last_credential(fake) == other, "the session left its workspace"
        for _ in range(3):
            ask(client, max_tokens=8, **session)
            assert last_credential(fake) == other
        assert fake.count(KEY_C) == 0
        # a request without a session goes by headroom (and weight): the other workspace
        ask(client, max_tokens=8)
        assert last_credential(fake) == KEY_C


# --- operator control and view ----------------------------------------------------------------


def test_disable_enable_and_the_account_view(relay: RelayServer, fake: FakeUpstream) -> None:
    a_id = relay.add_account("a", KEY_A, fake.url, group="ws1", max_concurrency=4)
    relay.add_account("b", KEY_B, fake.url)
    _customer_id, key = relay.create_customer(balance_usd="5")
    with relay.admin() as admin, sdk(relay, key) as client:
        disabled = admin.post(f"/admin/accounts/{a_id}/disable").raise_for_status().json()
        assert disabled["status"] == "disabled"
        for i in range(4):
            ask(client, text=f"while disabled {i}", max_tokens=8)
        assert counts(fake, KEY_A, KEY_B) == (0, 4)
        enabled = admin.post(f"/admin/accounts/{a_id}/enable").raise_for_status().json()
        assert enabled["status"] == "active"
        ask(client, max_tokens=8)  # unseen, so the roomiest
        assert counts(fake, KEY_A, KEY_B) == (1, 4)

        response = admin.get("/admin/accounts")
        assert response.status_code == 200
        assert KEY_A not in response.text and KEY_B not in response.text
        assert "pool-aaaa" not in response.text
        items = response.json()["items"]
        assert len(items) == 2
        for item in items:
            assert set(item) >= ACCOUNT_FIELDS, ACCOUNT_FIELDS - set(item)
            assert item["status"] == "active"
            assert item["base_url"] == fake.url
            assert item["in_flight"] == 0
            assert item["fingerprint"].startswith("sk-ant-")
            assert item["fingerprint"][-4:] in (KEY_A[-4:], KEY_B[-4:])
        a = next(i for i in items if i["id"] == a_id)
        assert a["group"] == "ws1" and a["name"] == "a"
        assert a["headroom"]["requests"]["limit"] == 4000
        assert admin.get(f"/admin/accounts/{a_id}").json()["id"] == a_id
        # the admin API needs the admin token
        assert httpx.get(f"{relay.url}/admin/accounts", timeout=10).status_code == 401


# --- long streams ------------------------------------------------------------------------------


def test_a_stream_longer_than_its_lease_keeps_its_slot(
    relay: RelayServer, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease expires so that a crashed process cannot leak its slot; a live stream that
    outlasts the expiry renews it, so the account's concurrency cap still counts it."""
    relay.add_account("a", KEY_A, fake.url, max_concurrency=1)
    monkeypatch.setattr(relay.services.scheduler, "_lease_ttl", 0.6)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.3)  # 8 events: ~2.1 s, 3.5 lease lifetimes
    done: list[bytes] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 16, "stream": True,
                  "messages": [{"role": "user", "content": "slow please"}]},
            timeout=30,
        ) as r:  # fmt: skip
            done.append(b"".join(r.iter_raw()))

    thread = threading.Thread(target=stream)
    thread.start()
    seen: list[int] = []
    deadline = time.monotonic() + 1.6
    time.sleep(0.3)
    while time.monotonic() < deadline:  # well past the first expiry
        seen.append(accounts(relay)["a"]["in_flight"])
        time.sleep(0.2)
    thread.join(timeout=30)
    assert done and done[0].count(b"event: message_stop") == 1
    assert seen and all(n == 1 for n in seen), seen
    assert accounts(relay)["a"]["in_flight"] == 0
