"""Health probes: a free call (``GET /v1/models``) that tells whether an account works again.

A probe never sends a billed message. Its answer is read with the same table as relayed
traffic (:func:`pool.upstream.classify`): a 2xx returns the account to service; anything else
keeps it quarantined, with the error kept for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pool.crypto import Secret
from pool.upstream import Verdict, classify, parse_error

if TYPE_CHECKING:  # httpx is imported when a probe runs: the relay process rarely needs it
    import httpx


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    status: int | None
    verdict: Verdict | None
    detail: str


async def probe(
    http: httpx.AsyncClient, base_url: str, credential: Secret, *, timeout_seconds: float = 10.0
) -> ProbeResult:
    import httpx

    try:
        response = await http.get(
            f"{base_url.rstrip('/')}/v1/models",
            params={"limit": "1"},
            headers={
                "x-api-key": credential.reveal(),
                "anthropic-version": "2023-06-01",
                "accept-encoding": "identity",
            },
            timeout=timeout_seconds,
        )
    except (httpx.HTTPError, OSError) as exc:
        return ProbeResult(False, None, None, f"{type(exc).__name__}: connection failed")
    body = response.content
    verdict = classify(response.status_code, body)
    if response.status_code < 300:
        return ProbeResult(True, response.status_code, verdict, "ok")
    info = parse_error(body)
    return ProbeResult(
        False,
        response.status_code,
        verdict,
        f"{response.status_code} {info.type or ''}: {info.message or ''}".strip(),
    )
