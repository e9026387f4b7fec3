"""The money of batches without a server: the hold rounds up once at the batch rate, result
lines are read from a stream whatever its chunking, and only succeeded lines cost anything."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.batch_settlement import jsonl_lines, line_charge
from billing.batch_billing import at_batch_rate, batch_hold_micros, line_request_id
from billing.estimate import worst_case_usage
from billing.pricing import SEED_PRICES, Price, PriceBook, Usage, cost_micros, total_cost_micros

HAIKU = next(p for p in SEED_PRICES if p.model == "claude-haiku-4-5")
BOOK = PriceBook(SEED_PRICES)


def params(text: str, max_tokens: int = 100) -> dict[str, object]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }


def test_the_hold_is_half_of_every_worst_case_rounded_up_once() -> None:
    requests = [params("a"), params("bb" * 50, 7), params("c", 1)]
    hold = batch_hold_micros([(p, HAIKU) for p in requests], Decimal(1))
    full = sum(cost_micros(worst_case_usage(p, HAIKU), HAIKU) for p in requests)
    assert hold <= (full + 1) // 2 + 1
    assert hold >= full // 2 - len(requests)
    assert batch_hold_micros([(p, HAIKU) for p in requests], Decimal("1.5")) >= hold


def test_rounding_happens_once_for_the_whole_batch() -> None:
    cheap = Price("m", input=1, output=0, cache_write_5m=0, cache_write_1h=0, cache_read=0)
    one_token = Usage(input_tokens=1, service_tier="batch")  # 0.0000005 µUSD each
    assert cost_micros(one_token, cheap) == 1
    assert total_cost_micros([(one_token, cheap)] * 3) == 1  # not 3


@given(st.lists(st.integers(min_value=0, max_value=200_000), min_size=1, max_size=20))
def test_total_is_never_below_the_exact_sum(tokens: list[int]) -> None:
    usages = [
        (Usage(input_tokens=t, output_tokens=t // 3, service_tier="batch"), HAIKU) for t in tokens
    ]
    total = total_cost_micros(usages)
    exact = sum(
        Decimal(u.input_tokens * HAIKU.input + u.output_tokens * HAIKU.output) for u, _ in usages
    ) / Decimal(2_000_000)
    assert total >= exact > total - 1


def test_line_ids_are_stable_and_fit_the_ledger() -> None:
    a = line_request_id("msgbatch_01abc", "row-1")
    assert a == line_request_id("msgbatch_01abc", "row-1")
    assert a != line_request_id("msgbatch_01abc", "row-2")
    assert a != line_request_id("msgbatch_01abd", "row-1")
    assert len(a) <= 40


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
async def test_result_lines_survive_any_chunking(size: int) -> None:
    lines = [orjson.dumps({"custom_id": f"r{i}", "result": {"type": "expired"}}) for i in range(20)]
    data = b"\n".join(lines)  # no final newline
    got = [line async for line in jsonl_lines(_chunks(data, size))]
    assert got == lines


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _line(kind: str, usage: dict[str, object] | None = None) -> bytes:
    result: dict[str, object] = {"type": kind}
    if kind == "succeeded":
        result["message"] = {"id": "msg_1", "model": "claude-haiku-4-5-20251001", "usage": usage}
    return orjson.dumps({"custom_id": "row", "result": result})


def test_only_succeeded_lines_cost_and_always_at_the_batch_rate() -> None:
    for kind in ("errored", "canceled", "expired"):
        assert line_charge(_line(kind), BOOK, Decimal(1)) is None
    # a line reporting the standard tier is billed at the batch rate all the same
    usage = {"input_tokens": 1000, "output_tokens": 1000, "service_tier": "standard"}
    charge = line_charge(_line("succeeded", usage), BOOK, Decimal(1))
    assert charge is not None
    assert charge.cost_micros == (1000 * 1_000_000 + 1000 * 5_000_000) // 2_000_000
    assert charge.model == "claude-haiku-4-5-20251001"
    # cache rates on top of the discount
    cached = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 10_000}
    charge = line_charge(_line("succeeded", cached), BOOK, Decimal(1))
    assert charge is not None and charge.cost_micros == 10_000 * 100_000 // 2_000_000
    assert line_charge(b"not json", BOOK, Decimal(1)) is None
    assert at_batch_rate(Usage()).service_tier == "batch"
