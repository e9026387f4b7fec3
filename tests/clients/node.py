"""The JavaScript clients of the client tests: pinned npm packages, installed once into a cache.

``npm install --prefix <cache>/node-<hash> pkg@version …`` runs the first time a test needs the
packages, under a file lock (two test runs never install at once), and leaves a marker file once
the install has been checked (the SDK's version, ``claude --version``); later runs reuse the
directory. ``<hash>`` covers the pins and the platform, so a new pin gets a fresh directory.
The cache lives in ``$POOLRELAY_TEST_CACHE`` if set, else ``$XDG_CACHE_HOME/poolrelay-tests``
(``~/.cache/poolrelay-tests``).

``python -m tests.clients.node`` installs (or checks) the cache and prints its directory; CI runs
it before the suite so that a broken install is reported on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PINS: Mapping[str, str] = {
    "@anthropic-ai/claude-code": "2.1.332",
    "@anthropic-ai/sdk": "1.15.0",
}
"""Exact versions (``npm view <pkg> version`` when they were pinned)."""

INSTALL_TIMEOUT = 600.0
MARKER = ".poolrelay-installed.json"


class NodeSetupError(RuntimeError):
    """The packages could not be installed or do not work; the message says what to do."""


@dataclass(frozen=True)
class NodeTools:
    prefix: Path
    node: str
    claude: Path
    sdk_entry: Path
    """``@anthropic-ai/sdk``'s ESM entry, for ``import()`` from a script anywhere."""


def run_bounded(
    args: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program in its own process group with a hard deadline: on timeout the whole group
    (the program and anything it started) is killed and ``TimeoutExpired`` raised."""
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def cache_root() -> Path:
    explicit = os.environ.get("POOLRELAY_TEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "poolrelay-tests"


def prefix_dir(pins: Mapping[str, str] = PINS) -> Path:
    spec = json.dumps(
        {"pins": dict(sorted(pins.items())), "platform": sys.platform, "arch": platform.machine()},
        sort_keys=True,
    )
    return cache_root() / f"node-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 12) -> str:
    """The end of a command's output, without the stack traces npm prints."""
    stack = re.compile(r"^(npm (error|ERR!))?\s+at ")
    kept = [line for line in text.strip().splitlines() if not stack.match(line)]
    return "\n".join(kept[-lines:])


def _tools(prefix: Path, node: str) -> NodeTools:
    modules = prefix / "node_modules"
    return NodeTools(
        prefix=prefix,
        node=node,
        claude=modules / ".bin" / "claude",
        sdk_entry=modules / "@anthropic-ai" / "sdk" / "index.mjs",
    )


def _problems(tools: NodeTools, pins: Mapping[str, str]) -> list[str]:
    """What is wrong with an installed prefix (nothing: it is usable)."""
    problems = []
    modules = tools.prefix / "node_modules"
    for package, version in pins.items():
        manifest = modules / package / "package.json"
        try:
            found = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            problems.append(f"{package} is not installed")
            continue
        if found != version:
            problems.append(f"{package} is {found}, not {version}")
    if not tools.sdk_entry.is_file():
        problems.append(f"{tools.sdk_entry} is missing")
    if "@anthropic-ai/claude-code" in pins:
        try:
            proc = run_bounded([str(tools.claude), "--version"], timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"`claude --version` failed: {exc}")
        else:
            if not proc.stdout.startswith(pins["@anthropic-ai/claude-code"]):
                problems.append(
                    f"`claude --version` exited {proc.returncode}: "
                    f"{_tail(proc.stdout + proc.stderr, 5)!r}"
                )
    return problems


def _finish_claude_code(tools: NodeTools) -> None:
    """The CLI's postinstall copies its native binary (from the platform package npm installed as
    an optional dependency) over a placeholder; an npm that holds back install scripts leaves the
    placeholder, so run the postinstall here."""
    package = tools.prefix / "node_modules" / "@anthropic-ai" / "claude-code"
    run_bounded([tools.node, "install.cjs"], timeout=120, cwd=package)


def ensure_installed(pins: Mapping[str, str] = PINS) -> NodeTools:
    """The cache directory with ``pins`` installed and checked; installs them the first time."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if not node or not npm:
        raise NodeSetupError(
            "node and npm are needed: install them with `apt-get install nodejs npm`"
        )
    prefix = prefix_dir(pins)
    tools = _tools(prefix, node)
    marker = prefix / MARKER
    with _locked(prefix.with_name(prefix.name + ".lock")):
        if marker.is_file() and not _problems(tools, pins):
            return tools
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True)
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
        args = [npm, "install", "--no-audit", "--no-fund", "--save-exact", "--prefix", str(prefix)]
        args += [f"{package}@{version}" for package, version in pins.items()]
        try:
            proc = run_bounded(args, timeout=INSTALL_TIMEOUT, env=env)
        except subprocess.TimeoutExpired as exc:
            raise NodeSetupError(
                f"`{' '.join(args[:2])} …` took over {INSTALL_TIMEOUT:.0f} s "
                "(is the npm registry reachable?)"
            ) from exc
        if proc.returncode != 0:
            raise NodeSetupError(
                f"`npm install {' '.join(args[-len(pins) :])}` exited {proc.returncode} "
                f"(is the npm registry reachable?):\n{_tail(proc.stdout + proc.stderr)}"
            )
        problems = _problems(tools, pins)
        if problems and "@anthropic-ai/claude-code" in pins:
            _finish_claude_code(tools)
            problems = _problems(tools, pins)
        if problems:
            raise NodeSetupError(f"the npm install in {prefix} is unusable: " + "; ".join(problems))
        marker.write_text(json.dumps(dict(pins), indent=2) + "\n")
        return tools


def main() -> int:
    try:
        tools = ensure_installed()
    except NodeSetupError as exc:
        print(f"client tests: {exc}", file=sys.stderr)
        return 1
    print(tools.prefix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
