"""The edge of the service, before any route reads a byte of the body: API key, body size, body pace.

Who needs a key: ``/v1/`` and ``/v2/`` the API key(s) (``WINNOW_API_KEY``, comma-separated); ``/metrics``
the metrics key (``WINNOW_METRICS_API_KEY``) when set, else the API key(s) — its counters (score-cache
hits above all) tell about other callers' requests — and only when neither is set are both open.
``/health``, ``/ready``, ``/`` and ``/docs`` stay open, but ``/ready`` shows no file paths to a caller
without a valid key (:func:`caller_of`). The API key that matched also names the caller's score-cache
partition (``WINNOW_RERANK_CACHE_SCOPE=key``), set for the request in :data:`cache.CALLER`.

Pure ASGI (no BaseHTTPMiddleware task per request). Order matters: an unauthenticated client is answered
401 from its headers alone, and an oversized body 413 from its ``Content-Length`` — or, when it streams
without one, as soon as the bytes read pass the limit — so neither costs the server the body's memory.
A body that stalls between chunks for ``WINNOW_HTTP_BODY_TIMEOUT`` gets 408.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from typing import Any

from pipeline.api.errors import ApiError, error_body
from pipeline.config import Settings
from pipeline.rerank.cache import CALLER

# the API routes, each dialect's paths included (/rerank, /score: vLLM, TEI, Infinity; /info: TEI);
# /health, /ready, /metrics, / and /docs stay open
PROTECTED = ("/v1/", "/v2/", "/rerank", "/score", "/info")
METRICS = "/metrics"
READY = "/ready"
SCOPE_KEY = "winnow_caller"  # in scope["state"]: who the request authenticated as (None: nobody)
WRITES = "/v1/documents"  # POST / DELETE under it write; GET reads
READ_METHODS = {"GET", "HEAD"}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            "body_too_large",
            f"the request body is over {limit} bytes (WINNOW_MAX_BODY_BYTES): split the request",
        )


class BodyTimeout(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, "body_timeout", f"the request body stalled for over {seconds:g} s; send it again"
        )


UNAUTHORIZED = ApiError(
    401,
    "unauthorized",
    "missing or wrong API key: send 'Authorization: Bearer <WINNOW_API_KEY>'",
    {"WWW-Authenticate": "Bearer"},
)
METRICS_UNAUTHORIZED = ApiError(
    401,
    "unauthorized",
    "missing or wrong metrics key: send 'Authorization: Bearer <WINNOW_METRICS_API_KEY>' (or, "
    "when that is unset, the API key)",
    {"WWW-Authenticate": "Bearer"},
)


WRITES_OFF = ApiError(
    403,
    "writes_disabled",
    "the write routes are off on this server: set WINNOW_WRITE_API_KEY (and send it as "
    "'Authorization: Bearer <key>'), or WINNOW_WRITES=on for a local single-user server",
)
WRITES_FORCED_OFF = ApiError(
    403, "writes_disabled", "the write routes are off on this server (WINNOW_WRITES=off)"
)
READ_ONLY_KEY = ApiError(
    403,
    "read_only_key",
    "this key may only read: writes need 'Authorization: Bearer <WINNOW_WRITE_API_KEY>'",
)
NEED_WRITE_KEY = ApiError(
    401,
    "unauthorized",
    "missing or wrong write key: send 'Authorization: Bearer <WINNOW_WRITE_API_KEY>'",
    {"WWW-Authenticate": "Bearer"},
)


def is_write(scope: dict[str, Any]) -> bool:
    return scope["path"].startswith(WRITES) and scope.get("method", "GET") not in READ_METHODS


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


def authorized(scope: dict[str, Any], key: str) -> bool:
    return matching_key(scope, [key]) is not None


def matching_key(scope: dict[str, Any], keys: list[str]) -> str | None:
    """The key of ``keys`` the request's Bearer token equals (each compared in constant time)."""
    raw = _header(scope, b"authorization") or b""
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    found = None
    for key in keys:  # no early exit: the time does not say which key matched
        if secrets.compare_digest(token, key.encode()):
            found = key
    return found


def caller_of(scope: dict[str, Any]) -> str | None:
    """The partition name of the key the request authenticated with (None: no valid key sent)."""
    state = scope.get("state")
    return state.get(SCOPE_KEY) if isinstance(state, dict) else None


def key_name(key: str) -> str:
    """A short, non-reversible name for a key: what the cache partition and state carry."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


async def _send_error(send: Any, exc: ApiError) -> None:
    body = json.dumps(error_body(exc.type, exc.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Keys: reads need WINNOW_API_KEY (or the write key) when one is set; writes need the write
    key when one is set (a read key gets 403), and are off without one unless WINNOW_WRITES=on
    (then the read rule applies to them)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.keys = settings.api_keys
        self.metrics_keys = settings.metrics_keys
        wkey = settings.write_api_key
        self.write_key = wkey.get_secret_value() if wkey is not None else None
        self.writes = settings.writes
        self.writes_on = settings.writes_enabled
        others = [*self.metrics_keys, *([self.write_key] if self.write_key else [])]
        self.any_keys = self.keys + [k for k in others if k not in self.keys]
        self.per_key_cache = settings.rerank_cache_scope == "key"
        self.limit = settings.max_body_bytes
        self.body_timeout = settings.http_body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == METRICS:
            if self.metrics_keys and matching_key(scope, self.metrics_keys) is None:
                await _send_error(send, METRICS_UNAUTHORIZED)
                return
        elif path == READY:  # open, but paths only for a caller with a key (routes.ready)
            key = matching_key(scope, self.any_keys) if self.any_keys else None
            scope.setdefault("state", {})[SCOPE_KEY] = key_name(key) if key is not None else None
        elif path.startswith(PROTECTED):
            refusal, key = self._refusal(scope)
            if refusal is not None:
                await _send_error(send, refusal)
                return
            token = CALLER.set(key_name(key) if key is not None and self.per_key_cache else "")
            try:
                await self._guarded(scope, receive, send)
            finally:
                CALLER.reset(token)
            return
        await self.app(scope, receive, send)

    async def _guarded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_error(send, BodyTooLarge(self.limit))
            return
        try:
            body = await self._read_body(receive)
        except ApiError as exc:
            await _send_error(send, exc)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards the app only listens for a disconnect

        await self.app(scope, replay, send)

    def _refusal(self, scope: dict[str, Any]) -> tuple[ApiError | None, str | None]:
        """Why this request may not run (or None), from its path, method and Authorization header
        alone, and the key it authenticated with (None: no key sent or none needed).

        Who the caller is comes first (401), then what they may do (403).
        """
        write_ok = self.write_key is not None and authorized(scope, self.write_key)
        read_key = matching_key(scope, self.keys) if self.keys else None
        read_ok = read_key is not None
        key = read_key if read_ok else (self.write_key if write_ok else None)
        if is_write(scope):
            if not self.writes_on:
                if self.keys and not (read_ok or write_ok):
                    return UNAUTHORIZED, None
                return (WRITES_FORCED_OFF if self.writes == "off" else WRITES_OFF), None
            if self.write_key is not None:
                if write_ok:
                    return None, key
                return (READ_ONLY_KEY if read_ok else NEED_WRITE_KEY), None
        if self.keys and not (read_ok or write_ok):
            return UNAUTHORIZED, None
        return None, key

    async def _read_body(self, receive: Any) -> bytes:
        """The whole body, refused past ``limit`` bytes or when a chunk takes over ``body_timeout``.

        Read here rather than in the app: the framework turns any error raised while it reads the body
        into a generic 400, and the API's bodies are read whole anyway (JSON).
        """
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.disconnect":
                raise ApiError(499, "client_closed", "client closed the request")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})  # never refused: probes must always answer


class TooManyRequests(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            429,
            "overloaded",
            f"the server has {limit} requests in progress (WINNOW_HTTP_MAX_CONCURRENCY); retry "
            "shortly",
            {"Retry-After": "1"},
        )


class RequestLimit:
    """At most ``WINNOW_HTTP_MAX_CONCURRENCY`` requests in progress; the next get 429 at once.

    Counted here, per request, rather than by uvicorn's ``limit_concurrency``, which counts open
    connections: idle sockets that send nothing filled it and turned every request into 503,
    ``/health`` included (issue 27). The ops routes are not counted and never refused. Runs inside
    the guard: a request counts once it is authenticated and its body read.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.limit = settings.http_max_concurrency
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.limit:
            await _send_error(send, TooManyRequests(self.limit))
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
