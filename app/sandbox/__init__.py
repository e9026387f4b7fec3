"""A sandbox upstream that speaks the Anthropic Messages API, as strictly as Anthropic.

poolrelay's tests, its benchmarks and new users without an Anthropic key point the relay's
upstream accounts at this app instead of ``https://api.anthropic.com``. It answers like
Anthropic does (see ``spec/anthropic-wire.md``): the same JSON bodies, the same SSE byte format,
the same error shapes and statuses, ``request-id`` / ``anthropic-organization-id`` headers and
per-credential ``anthropic-ratelimit-*`` headers; and it refuses what Anthropic refuses, so that
a relay that forwards a broken request finds out here. Everything it generates is
deterministic and cheap (plain checks, no pydantic), so that benchmarks can push thousands of
requests per second through it.

Run it with ``poolrelay fake-upstream [--host H] [--port 8081]`` (which calls :func:`run`), or
mount :func:`create_fake_app` in-process, e.g.
``httpx.AsyncClient(transport=httpx.ASGITransport(app=create_fake_app()))``.
All state lives in a :class:`FakeState` stored as ``app.state.fake``, so two apps in one
process share nothing.

Modules: ``app`` (routes, :func:`run`), ``gate`` (what every endpoint checks first; how it
answers), ``validation`` (the checks), ``messages`` (Messages and count_tokens), ``models``
(the models endpoints) over ``catalog`` (models and aliases), ``prompt`` (token estimate),
``cache`` (prompt-cache simulation), ``reply`` (the planned reply), ``render`` (JSON and SSE),
``faults`` (scripted faults, rate-limit buckets), ``batches`` (Message Batches), ``files``
(the Files API), ``paging`` (list pages), ``state``, ``control`` (``/_fake/*``), ``common`` (ids,
raw responses, error bodies).

What it refuses
---------------
Every error is ``{"type":"error","error":{"type":..,"message":..},"request_id":"req_…"}`` with
``request-id`` and ``x-should-retry`` headers (``false`` on 400, 401, 403, 404, 413; ``true``
on 408, 409, 429 and 5xx, 529 included). On ``/v1/messages``, ``/v1/messages/count_tokens``,
``/v1/models`` and ``/v1/models/{id}``, in this order:

1. No credential (neither ``x-api-key`` nor ``Authorization: Bearer``): 401
   ``authentication_error`` "x-api-key header is required". A credential that does not start
   with ``sk-ant-``: 401 ``authentication_error`` "invalid x-api-key". These two carry no
   ``anthropic-organization-id`` and no rate-limit headers. Any ``sk-ant-…`` credential is
   accepted; ``x-api-key`` wins when both headers are sent (the 2.x SDKs send API keys as
   ``Authorization: Bearer``).
2. No ``anthropic-version``: 400 ``invalid_request_error`` "anthropic-version: header is
   required"; one that is not ``2023-01-01``, ``2023-06-01`` or ``2026-10-21`` (what the 2.x
   Python and 1.x TypeScript SDKs send; a repeated header counts as the joined "a, b"): 400
   ``invalid_request_error`` 'anthropic-version: "<v>" is not a valid version'.
3. A scripted fault for the credential (below).
4. Messages and count_tokens only: a body over 32 MB: 413 ``request_too_large``; a body that is
   not JSON: 400 "The request body is not valid JSON: …"; then 400 ``invalid_request_error``,
   with a message naming the field, for: a body that is not an object; ``model`` missing or
   not a non-empty string; (Messages only) ``max_tokens`` missing, not an integer (``true`` is
   not one), or below 1, and ``stream`` not a boolean; ``messages`` missing, not a list, or
   empty; a message that is not an object, whose ``role`` is missing or not ``user``,
   ``assistant`` (or ``system``, accepted since 2026-05), whose ``content`` is missing or is
   neither a string nor a list of blocks; a block that is not an object or has no string
   ``type``; a ``text`` block without a string ``text``; ``system`` neither a string nor a
   list of ``text`` blocks; ``tools`` not a list of objects; ``tool_choice`` not an object
   with a string ``type`` (and a string ``name`` for ``tool``); ``temperature`` or ``top_p``
   not a number; ``top_k`` not an integer; ``metadata`` not an object, or its ``user_id`` not a
   string; ``stop_sequences`` not a list of strings; ``thinking`` not an object with a string
   ``type``, or ``enabled`` with ``budget_tokens`` not an integer ≥ 1024 or not below
   ``max_tokens``. Under ``anthropic-version: 2026-10-21`` also: (Messages) ``temperature``,
   ``top_p`` or ``top_k`` present at all: "temperature: Extra inputs are not permitted"; a
   ``document`` block in an ``assistant`` message; a ``text`` block with non-empty
   ``citations`` in a ``user`` message (directly or inside a ``search_result``).
5. An unknown ``model`` (neither an id of ``GET /v1/models`` nor an alias): 404
   ``not_found_error`` "model: <name>"; (Messages) ``max_tokens`` above the model's: 400
   "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for
   claude-haiku-4-5-20251001".
6. Messages: the credential's rate limits (below): 429 ``rate_limit_error`` with
   ``retry-after``. Models: ``limit`` outside 1–1000, an unknown ``after_id``/``before_id``:
   400; ``GET /v1/models/{id}`` of an unknown id: 404 ``not_found_error`` "model: <id>".

Any other path: 404 ``not_found_error`` (405 for a wrong method), with ``request-id``.
``null`` for an optional field counts as absent. Unknown top-level fields, unknown block types
and unknown fields inside known objects pass (new API fields must not be refused).

Anthropic endpoints
-------------------
- ``POST /v1/messages`` (any query string, e.g. ``?beta=true``): JSON, or SSE with
  ``"stream": true`` (:mod:`app.sandbox.reply` describes the reply). An alias (``model:
  claude-haiku-4-5``) is answered with the dated id in ``model``, as Anthropic answers. Input
  tokens are estimated as ``ceil(chars / 4)`` of the prompt text (+3 per message, 1,000 per
  image or document), never more than the UTF-8 byte length of the body. ``cache_control``
  breakpoints (on tools, system blocks, message blocks, or top level) are simulated per
  (credential, model, prefix) (:mod:`app.sandbox.cache`).
- ``POST /v1/messages/count_tokens`` -> ``{"input_tokens": N}`` (the same estimate).
- ``GET /v1/models`` (``limit``, ``after_id``, ``before_id``) and ``GET /v1/models/{id}``, which
  resolves an alias to the newest dated id of its family (``claude-haiku-4-5`` ->
  ``claude-haiku-4-5-20251001``).

- Message Batches (``/v1/messages/batches``: create, list, retrieve, cancel, delete, results)
  and the Files API (``/v1/files``: upload, list, metadata, content, delete), each object scoped
  to the credential that created it (another credential's id: 404 ``not_found_error``); a
  Messages request naming another credential's ``file_id`` gets the same 404. Described in
  :mod:`app.sandbox.batches` and :mod:`app.sandbox.files`.

Rate limits: per credential, families ``requests`` (default 4,000), ``input-tokens``
(2,000,000), ``output-tokens`` (400,000) and ``tokens`` (input + output limits), refilled at the
next minute boundary. A message consumes 1 request, its uncached input (``input_tokens`` +
cache writes; cache reads do not count, as at Anthropic) and its output tokens. Token
``remaining`` values are rounded down to the nearest 1,000, requests are exact. A request that
would take a family below zero gets 429 ``rate_limit_error`` with ``retry-after``.
count_tokens and models consume nothing but carry the headers too. Benchmarks that push more
than 4,000 requests a minute through one credential should raise the limits first, e.g.
``POST /_fake/limits {"key": "*", "requests_limit": 1000000000}``.

Control API (not Anthropic's; no auth; JSON in and out)
-------------------------------------------------------
- ``POST /_fake/faults`` ``{"key": "<credential>" | "*", "fault": KIND, "times": N | null,
  "retry_after": 30, "delay": seconds, "after_events": 4, "paths": "messages" | "all"}``
  -> ``{"ok": true}``. One fault per key (a new one replaces the old); a key's own fault takes
  precedence over ``"*"``. ``times: null`` (default) lasts until cleared. Faults hit
  ``/v1/messages`` only, unless ``"paths": "all"`` (then count_tokens and models too). A fault
  applies after the credential and version checks, before the body is looked at. KIND:

  - ``rate_limit``: 429 ``rate_limit_error``, ``retry-after: <retry_after>``,
    ``x-should-retry: true``, ``anthropic-ratelimit-requests-remaining: 0``.
  - ``unauthorized``: 401 ``authentication_error`` "invalid x-api-key".
  - ``forbidden``: 403 ``permission_error``.
  - ``no_credit``: 400 ``invalid_request_error`` "Your credit balance is too low ...".
  - ``error``: any status with ``"status"``, ``"error_type"`` and ``"message"`` from the
    control request (e.g. a 404 ``not_found_error``), Anthropic-shaped.
  - ``server_error``: 500 ``api_error``. ``overloaded``: 529 ``overloaded_error``.
  - ``slow``: waits ``delay`` (default 1 s) before the response headers, and between SSE deltas.
  - ``slow_stream``: headers at once, then ``delay`` (default 1 s) between SSE events (a JSON
    reply is delayed by ``delay`` once).
  - ``paced``: a token-paced stream, as a model writes: headers and every event up to the
    first ``content_block_delta`` at once, then ``delay`` (default 0.02 s) between content
    deltas (the events after the last delta follow at once). A JSON reply is not delayed.
    With ``reply with 64 words``: the 64-delta, 20 ms stream of the streams benchmark
    (``tests/bench/streams.py``).
  - ``mid_stream_error``: a 200 SSE stream that sends ``after_events`` events (default 4,
    counting ``message_start``; never reaching ``message_delta``), then ``event: error`` with
    ``overloaded_error``, then ends. A non-streaming request gets 529 ``overloaded_error``.
  - ``hang``: waits ``delay`` (default 3600 s), then answers normally; the wait ends early if
    the client goes away.
  - ``disconnect``: closes the connection without any response. Under uvicorn the socket is
    closed (clients see "server disconnected without sending a response"). In-process
    (e.g. ``httpx.ASGITransport``) there is no socket: the app raises
    ``httpx.RemoteProtocolError``, which reaches the client as the same exception (with
    ``raise_app_exceptions=False`` the client gets a 500 instead).

- ``GET /_fake/faults`` -> ``{"faults": {key: {...}}}``; ``DELETE /_fake/faults[?key=K]`` clears
  all faults (or one key's).
- ``POST /_fake/limits`` ``{"key": "<credential>" | "*", "requests_limit"?, "tokens_limit"?,
  "input_tokens_limit"?, "output_tokens_limit"?, "remaining"?: {"requests"|"tokens"|
  "input-tokens"|"output-tokens": n}, "reset_in"?: seconds}`` -> ``{"ok": true, ...}``. Setting a
  limit refills that family to the new limit; ``tokens`` follows input + output unless set
  itself. ``remaining`` overrides what is left, and then the window lasts until the first
  minute boundary at least 30 s away (or ``reset_in`` seconds), so a test cannot race the
  refill. ``"*"`` changes the defaults and every known credential.
- ``POST /_fake/models`` ``{"id": "claude-test-9-20990101", "max_tokens"?: 64000,
  "max_input_tokens"?: 200000, "display_name"?, "created_at"?}`` -> ``{"ok": true, "model":
  {...}}``: one more model for this app (listed first), until ``/_fake/reset``.
- ``POST /_fake/batches`` ``{"processing_seconds": 0.5}`` -> ``{"ok": true, ...}``: how long
  batches created from then on take (default 0.5 s).
- ``POST /_fake/reset`` -> ``{"ok": true}``: forget faults, limits, cache, added models, stats,
  log, batches and files.
- ``GET /_fake/stats`` -> ``{"requests": {credential: n}, "total": n, "by_path": {path: n}}``:
  ``requests``/``total`` count ``/v1/messages`` requests (every one that arrived, whatever its
  outcome; a missing credential counts under ``""``); ``by_path`` counts every ``/v1/*`` path.
- ``GET /_fake/requests?limit=50`` -> a JSON array of the most recent requests, oldest first
  (ring buffer of 200): ``{"method", "path", "query" (raw query string), "headers"
  (lower-cased names; repeated headers joined with ", "), "body" (parsed JSON, or null when
  unparsable, absent or over 1 MiB), "body_bytes", "credential" (or null), "request_id",
  "status" (null while unanswered, 0 for a scripted disconnect)}``.
"""

from __future__ import annotations

from app.sandbox.app import create_fake_app, get_state, run
from app.sandbox.catalog import MODEL_ALIASES, MODELS, ModelInfo
from app.sandbox.faults import FAULT_KINDS, Fault
from app.sandbox.state import FakeState

__all__ = [
    "FAULT_KINDS",
    "MODELS",
    "MODEL_ALIASES",
    "FakeState",
    "Fault",
    "ModelInfo",
    "create_fake_app",
    "get_state",
    "run",
]
