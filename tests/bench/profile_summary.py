"""Summarize a ``py-spy record --format raw`` profile of the relay by what the time was for.

    python -m tests.bench.profile_summary PROFILE.txt [--top 25]

Each sample (a stack) goes to the first matching category, in this order:

- ``frames: upstream read`` — aiohttp receiving and parsing the upstream's bytes
  (``ResponseHandler.data_received`` and below: the HTTP parser, ``StreamReader.feed_data``,
  waking the reader, the per-chunk read-timeout reschedule);
- ``frames: meter`` — ``StreamMeter.feed`` (the usage meter);
- ``frames: client write`` — uvicorn's ``RequestResponseCycle.send`` (framing and writing each
  chunk to the client);
- ``frames: pump`` — the rest of ``RelayStream._pump`` (the per-chunk loop itself);
- ``stream end`` — ``RelayStream._finish`` (settlement, lease end, logs);
- ``admission`` — everything under the relay's request handling before the stream
  (authentication, holds, scheduling, the upstream connection and request);
- ``billing/redis batches`` — group commits and pipelined Redis calls running on their own;
- ``event loop`` — samples in the loop itself (``Runner.run`` at the top of the stack: uvloop's
  C code, callbacks' dispatch);
- ``other``.

Prints each category's share of the samples (py-spy samples running threads only, so shares
are of the relay's CPU), then the functions with the most samples of their own.
"""

from __future__ import annotations

import argparse
from collections import Counter

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("frames: upstream read", ("ResponseHandler.data_received",)),
    ("frames: meter", ("StreamMeter.feed",)),
    ("frames: client write", ("RequestResponseCycle.send",)),
    ("frames: pump", ("RelayStream._pump",)),
    ("stream end", ("RelayStream._finish",)),
    ("admission", ("Relay.handle", "PoolrelayApp.__call__", "run_asgi", "HttpToolsProtocol.")),
    ("billing/redis batches", ("GroupCommit.", "pipelined", "Pipeline.", "BatchQueue")),
)


def categorize(frames: list[str]) -> str:
    names = [f.split(" (")[0] for f in frames]
    for category, markers in CATEGORIES:
        if any(marker in name for name in names for marker in markers):
            return category
    if names and names[-1].startswith("Runner.run"):
        return "event loop"
    return "other"


def summarize(path: str, top: int) -> str:
    by_category: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if not line or " " not in line:
                continue
            stack, count_text = line.rsplit(" ", 1)
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            by_category[categorize(frames)] += count
            own[frames[-1]] += count
    if total == 0:
        return "no samples"
    out = [f"{total} samples"]
    for category, count in by_category.most_common():
        out.append(f"  {count / total * 100:5.1f}%  {category}")
    out.append("own time:")
    for frame, count in own.most_common(top):
        out.append(f"  {count / total * 100:5.1f}%  {frame[:140]}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()
