"""Usage roll-ups: old request-log rows fold into daily totals without changing any total."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from billing.models import RequestRecord
from tests.harness import FakeUpstream, RelayServer

UPSTREAM_KEY = "sk-ant-api03-rollup-key-0001"


def usage(relay: RelayServer, **params: str) -> dict[str, Any]:
    with relay.admin() as admin:
        result: dict[str, Any] = admin.get("/admin/usage", params=params).raise_for_status().json()
        return result


def test_rollup_moves_old_rows_and_keeps_every_total(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    from workers.tasks import rollup_usage

    relay.add_account("a", UPSTREAM_KEY, fake.url)
    customer_id, key = relay.create_customer()
    for model in ("claude-haiku-4-5", "claude-haiku-4-5", "claude-sonnet-4-6"):
        body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        assert (
            httpx.post(
                f"{relay.url}/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json=body,
            ).status_code
            == 200
        )
    old_day = datetime.now(UTC) - timedelta(days=120)
    table = RequestRecord.__table__  # type: ignore[attr-defined]

    async def backdate() -> None:
        async with relay.services.db.transaction() as session:
            ids = [
                r.id
                for r in (await session.execute(sa.select(table.c.id).order_by(table.c.id))).all()
            ]
            await session.execute(
                sa.update(table).where(table.c.id.in_(ids[:2])).values(started_at=old_day)
            )

    relay.call(backdate)
    groupings = ["", "model", "day", "key", "model,day", "account"]
    before = {g: usage(relay, group_by=g) if g else usage(relay) for g in groupings}
    assert before[""]["totals"]["requests"] == 3
    result = relay.call(lambda: rollup_usage({"services": relay.services}))
    assert result == {"moved": 2}
    assert relay.call(lambda: rollup_usage({"services": relay.services})) == {"moved": 0}
    after = {g: usage(relay, group_by=g) if g else usage(relay) for g in groupings}
    assert after == before
    day = old_day.date().isoformat()
    window = usage(relay, **{"from": day, "to": day, "customer_id": customer_id})
    assert window["totals"]["requests"] == 2
    with relay.admin() as admin:
        assert len(admin.get("/admin/requests").json()["items"]) == 1
