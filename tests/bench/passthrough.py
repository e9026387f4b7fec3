"""A bare passthrough relay: the benchmark's floor for "a Python HTTP hop".

    PASSTHROUGH_CREDENTIAL=sk-ant-… python -m tests.bench.passthrough \
        --upstream http://127.0.0.1:8081 [--host 127.0.0.1] [--port 8090]

The same serving stack as ``poolrelay serve`` (uvicorn with uvloop and httptools, no access
log, no proxy-header layer) and the same upstream client (:class:`pool.upstream.UpstreamClient`,
with the relay's own request and response header filters), and nothing else: no key lookup, no
hold, no lease, no settlement, no metrics, no logs. ``POST /v1/messages`` is forwarded with the
credential in ``PASSTHROUGH_CREDENTIAL`` (never an argument) and the answer is
relayed chunk by chunk as it arrives; ``GET /ready`` answers 200.

:mod:`tests.bench.bench_relay` runs every scenario through it as well as direct and through the
relay, in the same run, so that "relay vs passthrough" is what billing and scheduling add and
"passthrough vs direct" is what any Python relay on this machine costs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pool.upstream import UpstreamClient, customer_headers, upstream_headers

Scope = dict[str, Any]


class Passthrough:
    def __init__(self, upstream: str, credential: str) -> None:
        self.url = upstream.rstrip("/") + "/v1/messages"
        self.credential = credential
        self.client = UpstreamClient(connect_timeout=10, read_timeout=600)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/ready":
            await _plain(send, 200, b"ok")
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/messages":
            await _plain(send, 404, b"not found")
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        response = await self.client.send(
            "POST",
            self.url,
            headers=upstream_headers(headers, self.credential),
            content=b"".join(chunks),
            connect_timeout=10,
        )
        try:
            out = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in customer_headers(response.headers)
            ]
            start = {"type": "http.response.start", "status": response.status_code}
            await send({**start, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


async def _plain(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the upstream's API root (no /v1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    credential = os.environ.get("PASSTHROUGH_CREDENTIAL")
    if not credential:
        parser.error("set PASSTHROUGH_CREDENTIAL to the upstream credential")
    import uvicorn

    uvicorn.run(
        Passthrough(args.upstream, credential),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
