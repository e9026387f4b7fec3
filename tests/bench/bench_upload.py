"""Benchmark: a multi-hundred-MB file upload streamed through the relay, with flat memory.

    python -m tests.bench.bench_upload [--mb 300] [--keep]

Starts ``poolrelay fake-upstream`` and ``poolrelay serve`` (embedded defaults: a scratch SQLite
file and an in-process Redis, in a temporary directory), adds one upstream account with
``poolrelay accounts add`` (credential on stdin) and a customer with a key (admin API), then
uploads a file of ``--mb`` MiB to ``POST /v1/files`` as a multipart body generated on the fly
(the client holds no copy either), downloads it back from ``GET /v1/files/{id}/content``, and
prints the relay's resident memory (``VmRSS`` from ``/proc/<pid>/status``) before, during
(sampled every 50 ms; the peak) and after each, with the throughput. Linux only (``/proc``).
Nothing is asserted; the relay's memory should stay flat (tens of MB), whatever ``--mb``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.bench.bench_relay import RssSampler

ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
CREDENTIAL = "sk-ant-api03-bench-upload-0001"
CHUNK = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poolrelay() -> list[str]:
    script = Path(sys.executable).with_name("poolrelay")
    if script.exists():
        return [sys.executable, str(script)]
    found = shutil.which("poolrelay")
    if found is None:
        raise SystemExit("poolrelay is not installed: pip install -e .")
    return [found]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not start")


def multipart(size: int, boundary: str) -> tuple[Iterator[bytes], int]:
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; '
        f'filename="big.bin"\r\ncontent-type: application/octet-stream\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = bytes(range(256)) * (CHUNK // 256)

    def chunks() -> Iterator[bytes]:
        yield head
        left = size
        while left > 0:
            piece = block[: min(CHUNK, left)]
            left -= len(piece)
            yield piece
        yield tail

    return chunks(), len(head) + size + len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="file size in MiB (at most 499)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size = min(args.mb, 499) * 1024 * 1024
    workdir = Path(tempfile.mkdtemp(prefix="poolrelay-bench-upload-"))
    env = {
        **os.environ,
        "POOLRELAY_DATABASE_URL": f"sqlite:///{workdir / 'poolrelay.db'}",
        "POOLRELAY_REDIS_URL": "memory://",
        "POOLRELAY_KEY_FILE": str(workdir / "poolrelay.key"),
        "POOLRELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "POOLRELAY_LOG_LEVEL": "WARNING",
    }
    fake_port, relay_port = free_port(), free_port()
    fake_url, relay_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{relay_port}"
    log = open(workdir / "servers.log", "wb")  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fake = subprocess.Popen(
            [*poolrelay(), "fake-upstream", "--port", str(fake_port)],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(fake)
        relay = subprocess.Popen(
            [*poolrelay(), "serve", "--port", str(relay_port)],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(relay)
        wait_ready(fake_url, fake, "/_fake/stats")
        wait_ready(relay_url, relay, "/healthz")
        subprocess.run(
            [*poolrelay(), "accounts", "add", "--name", "bench", "--base-url", fake_url],
            input=(CREDENTIAL + "\n").encode(),
            env=env,
            cwd=workdir,
            check=True,
            capture_output=True,
        )
        admin = httpx.Client(
            base_url=relay_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )
        customer = admin.post("/admin/customers", json={"name": "bench"}).raise_for_status()
        key = (
            admin.post(f"/admin/customers/{customer.json()['id']}/keys", json={"name": "k"})
            .raise_for_status()
            .json()["key"]
        )
        time.sleep(6)  # the running server picks up the CLI's account within 5 s
        client = httpx.Client(base_url=relay_url, headers={"x-api-key": key}, timeout=600)
        before = rss_mb(relay.pid)
        boundary = "bench" + secrets.token_hex(8)
        body, length = multipart(size, boundary)
        started = time.monotonic()
        with RssSampler(relay.pid) as during_upload:
            r = client.post(
                "/v1/files",
                content=body,
                headers={
                    "content-type": f"multipart/form-data; boundary={boundary}",
                    "content-length": str(length),
                    "anthropic-version": "2023-06-01",
                    "anthropic-beta": "files-api-2025-04-14",
                },
            )
        upload_s = time.monotonic() - started
        r.raise_for_status()
        meta = r.json()
        after_upload = rss_mb(relay.pid)
        started = time.monotonic()
        received = 0
        with (
            RssSampler(relay.pid) as during_download,
            client.stream(
                "GET",
                f"/v1/files/{meta['id']}/content",
                headers={"anthropic-version": "2023-06-01"},
            ) as down,
        ):
            down.raise_for_status()
            for chunk in down.iter_raw():
                received += len(chunk)
        download_s = time.monotonic() - started
        after_download = rss_mb(relay.pid)
        mib = size / (1024 * 1024)
        print(f"file: {mib:.0f} MiB (stored upstream: {meta['size_bytes']} bytes)")
        print(f"relay RSS before:            {before:7.1f} MB")
        print(
            f"relay RSS peak, upload:      {during_upload.peak_kb / 1024:7.1f} MB"
            f"   ({mib / upload_s:.0f} MiB/s, {upload_s:.1f} s)"
        )
        print(f"relay RSS after upload:      {after_upload:7.1f} MB")
        print(
            f"relay RSS peak, download:    {during_download.peak_kb / 1024:7.1f} MB"
            f"   ({received / (1024 * 1024) / download_s:.0f} MiB/s, {download_s:.1f} s)"
        )
        print(f"relay RSS after download:    {after_download:7.1f} MB")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")


if __name__ == "__main__":
    main()
