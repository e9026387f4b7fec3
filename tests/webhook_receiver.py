"""A webhook receiver on 127.0.0.1 for tests: checks every signature, answers 500 to the first
try of each event (``fail_first``) and 200 after; keeps what it received."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    signature_ok: bool
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    secret: str
    fail_first: bool = True
    redirect_to: str | None = None
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                expected = (
                    "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                )
                given = self.headers.get("x-poolrelay-signature", "")
                ok = hmac.compare_digest(expected, given)
                with receiver._lock:
                    event_id = json.loads(body).get("id") if body else None
                    seen = sum(1 for r in receiver.received if r.event.get("id") == event_id)
                    if receiver.redirect_to:
                        status = 307
                    elif not ok:
                        status = 401
                    elif receiver.fail_first and seen == 0:
                        status = 500
                    else:
                        status = 200
                    receiver.received.append(
                        Received(body, {k.lower(): v for k, v in self.headers.items()}, ok, status)
                    )
                self.send_response(status)
                if status == 307 and receiver.redirect_to:
                    self.send_header("location", receiver.redirect_to)
                self.send_header("set-cookie", "tracker=1; Path=/")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        with self._lock:
            return list(self.received)
