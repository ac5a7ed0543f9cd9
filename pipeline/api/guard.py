"""The edge of the service, before any route reads a byte of the body: API key, body size, body pace.

Pure ASGI (no BaseHTTPMiddleware task per request). Order matters: an unauthenticated client is answered
401 from its headers alone, and an oversized body 413 from its ``Content-Length`` — or, when it streams
without one, as soon as the bytes read pass the limit — so neither costs the server the body's memory.
A body that stalls between chunks for ``WINNOW_HTTP_BODY_TIMEOUT`` gets 408.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from pipeline.api.errors import ApiError, error_body
from pipeline.config import Settings

PROTECTED = ("/v1/", "/v2/")  # the API routes; /health, /ready, /metrics, / and /docs stay open
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
    raw = _header(scope, b"authorization") or b""
    scheme, _, token = raw.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key.encode())


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
        self.key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        wkey = settings.write_api_key
        self.write_key = wkey.get_secret_value() if wkey is not None else None
        self.writes = settings.writes
        self.writes_on = settings.writes_enabled
        self.limit = settings.max_body_bytes
        self.body_timeout = settings.http_body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(send, refusal)
            return
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

    def _refusal(self, scope: dict[str, Any]) -> ApiError | None:
        """Why this request may not run, from its path, method and Authorization header alone.

        Who the caller is comes first (401), then what they may do (403).
        """
        write_ok = self.write_key is not None and authorized(scope, self.write_key)
        read_ok = self.key is not None and authorized(scope, self.key)
        if is_write(scope):
            if not self.writes_on:
                if self.key is not None and not (read_ok or write_ok):
                    return UNAUTHORIZED
                return WRITES_FORCED_OFF if self.writes == "off" else WRITES_OFF
            if self.write_key is not None:
                if write_ok:
                    return None
                return READ_ONLY_KEY if read_ok else NEED_WRITE_KEY
        if self.key is not None and not (read_ok or write_ok):
            return UNAUTHORIZED
        return None

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
