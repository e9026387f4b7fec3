"""Everything one sandbox app remembers: faults, rate-limit buckets, cache, models, stats, log."""

from __future__ import annotations

import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request

from app.sandbox.cache import PromptCache
from app.sandbox.catalog import Catalog
from app.sandbox.common import Header
from app.sandbox.faults import DEFAULT_LIMITS, Bucket, Fault

if TYPE_CHECKING:
    from app.sandbox.batches import BatchStore
    from app.sandbox.files import FileStore

REQUEST_LOG_SIZE: Final = 200
LOGGED_BODY_MAX_BYTES: Final = 1024 * 1024
BUCKET_MAX_ENTRIES: Final = 100_000


class FakeState:
    """The state of one sandbox app (stored as ``app.state.fake``)."""

    def __init__(self) -> None:
        self.org_id: str = str(uuid.uuid4())
        self.org_header: Header = (b"anthropic-organization-id", self.org_id.encode())
        self.faults: dict[str, Fault] = {}
        self.default_limits: dict[str, int] = dict(DEFAULT_LIMITS)
        self.default_tokens_explicit = False
        self.buckets: dict[str, Bucket] = {}
        self.cache = PromptCache()
        self.models = Catalog()
        self.requests_by_key: dict[str, int] = {}
        self.by_path: dict[str, int] = {}
        self.total = 0
        self.log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)
        # imported here: those modules import the gate, which imports this one
        from app.sandbox.batches import BatchStore
        from app.sandbox.files import FileStore

        self.batches: BatchStore = BatchStore()
        self.files: FileStore = FileStore()

    def reset(self) -> None:
        """Forget everything but the organization id."""
        self.faults.clear()
        self.default_limits = dict(DEFAULT_LIMITS)
        self.default_tokens_explicit = False
        self.buckets.clear()
        self.cache.clear()
        self.models.reset()
        self.requests_by_key.clear()
        self.by_path.clear()
        self.total = 0
        self.log.clear()
        self.batches.clear()
        self.files.clear()

    def record(
        self,
        request: Request,
        path: str,
        body: Any,
        body_bytes: int,
        credential: str | None,
        request_id: str,
        is_messages: bool,
    ) -> dict[str, Any]:
        """Count a request and keep it in the log; returns the log entry (status to fill)."""
        self.by_path[path] = self.by_path.get(path, 0) + 1
        if is_messages:
            key = credential or ""
            self.requests_by_key[key] = self.requests_by_key.get(key, 0) + 1
            self.total += 1
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        entry: dict[str, Any] = {
            "method": request.method,
            "path": path,
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body": body if body_bytes <= LOGGED_BODY_MAX_BYTES else None,
            "body_bytes": body_bytes,
            "credential": credential,
            "request_id": request_id,
            "status": None,
        }
        self.log.append(entry)
        return entry

    def bucket(self, credential: str, now: float) -> Bucket:
        bucket = self.buckets.get(credential)
        if bucket is None:
            if len(self.buckets) >= BUCKET_MAX_ENTRIES:
                del self.buckets[next(iter(self.buckets))]
            bucket = Bucket(self.default_limits, self.default_tokens_explicit, now)
            self.buckets[credential] = bucket
        else:
            bucket.refresh(now)
        return bucket

    def take_fault(self, credential: str, is_messages: bool) -> Fault | None:
        """The fault that applies to this request, counting down its ``times``."""
        for key in (credential, "*"):
            fault = self.faults.get(key)
            if fault is None or not (is_messages or fault.all_paths):
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[key]
            return fault
        return None
