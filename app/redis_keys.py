"""The names of what the relay processes and the workers share in Redis, in one place.

Both composition roots (``app`` and ``workers``) import them from here, so the relay writes and
the workers read the same keys without either importing the other's code::

    poolrelay:instance:<instance id>   a relay process's heartbeat (expires)
    poolrelay:epoch                     when this Redis's data began (reconciliation trusts a
                                        missing heartbeat only well after it)
    poolrelay:progress:<request id>     what a running stream has used, for a crash
    poolrelay:probe:<account id>        a quarantined account's probe schedule (workers)
    poolrelay:rl:{<key id>}:reqs|tokens a key's rpm/tpm windows
    poolrelay:kc:{<key id>}:…           a key's concurrency slots and queue (app.keyslots)
    poolrelay:wake:<owner>              Pub/Sub: a process's waiters are handed their slots
    poolrelay:notify:budget_exhausted   SET of keys whose budget ran out since the last scan
                                        (the workers raise key.budget_exhausted)

The pool's own state (``poolrelay:{pool}:*``: headroom, leases, quarantines, the wait queue)
is :mod:`pool.scheduler`'s schema, named in its docstring; it publishes on the same
``poolrelay:wake:<owner>`` channels (:data:`WAKE_PREFIX`).
"""

from __future__ import annotations

from typing import Final

EPOCH: Final = "poolrelay:epoch"
WAKE_PREFIX: Final = "poolrelay:wake:"
BUDGET_EXHAUSTED: Final = "poolrelay:notify:budget_exhausted"


def instance(instance_id: str) -> str:
    return f"poolrelay:instance:{instance_id}"


def progress(request_id: str) -> str:
    return f"poolrelay:progress:{request_id}"


def probe(account_id: str) -> str:
    return f"poolrelay:probe:{account_id}"


def rate_windows(key_id: str) -> list[str]:
    return [f"poolrelay:rl:{{{key_id}}}:reqs", f"poolrelay:rl:{{{key_id}}}:tokens"]


def key_slots_base(key_id: str) -> str:
    return f"poolrelay:kc:{{{key_id}}}:"
