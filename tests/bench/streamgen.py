"""The streams benchmark's load generator: ``streamgen.c`` (epoll, one thread), built on demand.

:func:`binary` compiles ``tests/bench/streamgen.c`` with ``gcc -O2`` into
``$POOLRELAY_TEST_CACHE`` (default ``~/.cache/poolrelay-tests``) as ``streamgen-<hash of the
source>``, once per source version; without gcc it raises :class:`NoCompiler`, naming the
package to install. :func:`run` runs it and returns its JSON result.

What the generator does: opens ``concurrency`` connections to 127.0.0.1 at once, sends one
streaming ``POST`` on each (``rounds`` of them one after another, a new connection each), and
times every SSE frame (an event ended by a blank line) as it is read. A frame is *stalled* when
it arrives more than ``stall_ms`` after the frame before it, beyond the pacing: ``pace_ms`` is
expected before a ``content_block_delta`` that follows another delta, nothing before any other
frame. With ``duration`` each connection starts stream after stream until that many seconds
have passed (instead of ``rounds``), waiting ``error_pause_ms`` after a failed one; with
``disconnect_after`` K the generator closes each connection after its K-th delta (a client
going away mid-stream: counted as ``disconnected``, neither ok nor error). The result::

    {"concurrency", "rounds", "ok", "errors", "delivered" (streams answered 200),
     "disconnected", "error_kinds": {kind: n}, "frames",
     "stalled_frames", "stalled_streams",
     "stalls_by_delta": [at delta 1, 2, …, 8, later deltas and other frames],
     "max_excess_ms": the largest lateness of any frame beyond its expected gap,
     "wall_s", "cpu_s" (the generator's own CPU), "max_loop_ms" (its longest event-loop turn),
     "ttfb_ms", "ttft_ms", "gap_ms": {"p50", "p99", "max", "n"} or null}

``ttfb_ms`` is from the connection's start to the first response byte, ``ttft_ms`` to the first
``content_block_delta``, ``gap_ms`` the gaps between consecutive deltas of a stream. A stream is
an error when the status is not 200, it ends without ``message_stop``, the connection fails,
or (with ``expect_deltas``) it has another number of deltas.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("streamgen.c")


class NoCompiler(RuntimeError):
    """gcc is not on PATH."""


def cache_dir() -> Path:
    root = os.environ.get("POOLRELAY_TEST_CACHE") or str(Path.home() / ".cache/poolrelay-tests")
    return Path(root)


def binary() -> Path:
    """The compiled generator (built now if this source version was not built before)."""
    return build(SOURCE)


def build(path: Path) -> Path:
    """``path`` (a C file next to this module) compiled with ``gcc -O2``, cached by content."""
    source = path.read_bytes()
    target = cache_dir() / f"{path.stem}-{hashlib.sha256(source).hexdigest()[:12]}"
    if target.exists():
        return target
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise NoCompiler(
            "the streams benchmark's load generator is C and needs gcc: install it with "
            "`apt-get install gcc` (nothing was run)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / path.stem
        done = subprocess.run(
            [gcc, "-O2", "-Wall", "-o", str(out), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building {path.name} failed:\n{done.stderr}")
        out.replace(target)  # atomic: a concurrent build leaves one complete binary
    return target


def command(
    port: int,
    body_file: Path,
    *,
    headers: dict[str, str] | None = None,
    concurrency: int = 1,
    rounds: int = 1,
    pace_ms: float = 20.0,
    stall_ms: float = 50.0,
    expect_deltas: int = 0,
    timeout: float = 120.0,
    path: str = "/v1/messages",
    duration: float = 0.0,
    error_pause_ms: float = 0.0,
    disconnect_after: int = 0,
) -> list[str]:
    argv = [
        str(binary()),
        "--port", str(port),
        "--path", path,
        "--body-file", str(body_file),
        "--concurrency", str(concurrency),
        "--rounds", str(rounds),
        "--pace-ms", str(pace_ms),
        "--stall-ms", str(stall_ms),
        "--expect-deltas", str(expect_deltas),
        "--timeout", str(timeout),
        "--duration", str(duration),
        "--error-pause-ms", str(error_pause_ms),
        "--disconnect-after", str(disconnect_after),
    ]  # fmt: skip
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    return argv


def parse(stdout: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run(port: int, body: bytes, **options: Any) -> dict[str, Any]:
    """Run the generator against 127.0.0.1:``port`` and return its result (see the module)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        argv = command(port, Path(f.name), **options)
        timeout = float(options.get("timeout", 120.0)) + float(options.get("duration", 0)) + 30
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"streamgen failed ({done.returncode}): {done.stderr}")
    return parse(done.stdout)
