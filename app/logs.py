"""Structured logs: one JSON object per line, and one ``request`` event per customer request.

The request event carries ids (relay request id, upstream request id, customer, key, account)
and timings; never a credential, and a body only when ``LOG_BODIES`` is on (and then only in the
request log table, not in log lines).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in RESERVED and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call otherwise


request_log = logging.getLogger("poolrelay.request")


def log_request(**fields: Any) -> None:
    """The per-request event (INFO): ``{"event": "request", "request_id": …, …}``."""
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request", extra={"event": "request", **fields})
