"""The HTTP side of the remote reranker: URLs, endpoints with backoff, Retry-After, and calls that
cancel each other on the first failure. aiohttp is imported here (only the remote backend loads it)."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

T = TypeVar("T")

RETRY_STATUS = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
HEALTH_TIMEOUT_S = 2.0
KEEPALIVE_S = 4.0
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)  # connect, read, write, timeouts


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` → validated http(s) URLs (at least one)."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in items if u.strip()]
    if not out:
        raise ValueError(
            "the remote reranker needs WINNOW_RERANK_URL (e.g. http://host:8000/rerank)"
        )
    for url in out:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"WINNOW_RERANK_URL: {url!r} is not an http(s) URL")
    return out


def health_url(url: str) -> str:
    """``http://h:p/any/path`` → ``http://h:p/health`` (vllm serve and Winnow both answer there)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def backoff(failures: int) -> float:
    """Exponential backoff with jitter: half fixed, half random, capped."""
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    return step / 2 + random.uniform(0, step / 2)


@dataclass
class Endpoint:
    """One rerank URL and what this process knows about it."""

    url: str
    inflight: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0  # monotonic; skipped (or waited for) until then

    @property
    def health_url(self) -> str:
        return health_url(self.url)

    def failed(self, wait: float | None = None) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + (wait if wait is not None else backoff(self.failures))

    def succeeded(self) -> None:
        self.failures, self.down_until = 0, 0.0


async def all_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like ``gather``, but the first failure cancels the other calls instead of leaving them running."""
    if len(aws) == 1:  # the common case: nothing to run alongside, so no task to spawn and join
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class EndpointPool:
    """The rerank URLs of one reranker and the pooled HTTP session that reaches them."""

    def __init__(self, urls: Sequence[str], api_key: str | None, timeout: float) -> None:
        self.endpoints = [Endpoint(u) for u in urls]
        self.timeout = timeout
        self._api_key = api_key
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rr = 0

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def session(self) -> aiohttp.ClientSession:
        """The pooled session of the running loop (a new loop, e.g. a second ``asyncio.run``, gets
        its own: a session cannot outlive the loop its connections belong to)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.closed:
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            connector = aiohttp.TCPConnector(
                limit=100,
                # under the 5 s keep-alive of uvicorn (Winnow, vllm serve): a connection the server
                # is about to close is not reused
                keepalive_timeout=KEEPALIVE_S,
            )
            self._client = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=False,
                trust_env=False,  # straight to the URL: no proxy variables, no ~/.netrc per request
            )
            self._loop = loop
        return self._client

    def pick(self) -> tuple[Endpoint, float]:
        """(endpoint, seconds to wait): the least busy one that is up, round-robin among equals;
        when all are backing off, the one that comes back first."""
        now = time.monotonic()
        n = len(self.endpoints)
        up = [i for i, e in enumerate(self.endpoints) if e.down_until <= now]
        if up:
            best = min(up, key=lambda i: (self.endpoints[i].inflight, (i - self._rr) % n))
            self._rr = (best + 1) % n
            return self.endpoints[best], 0.0
        ep = min(self.endpoints, key=lambda e: e.down_until)
        return ep, ep.down_until - now

    async def aclose(self) -> None:
        """Close the session (only from the loop it belongs to; another loop's is dropped)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            await client.close()
