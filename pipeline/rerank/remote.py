"""Remote reranking: any ``/rerank`` HTTP server as the reranking stage (backend ``remote``).

Speaks the Cohere v2 / Jina request shape that ``vllm serve``, Cohere, Jina and Winnow's own
``/v1/rerank`` share: ``{model?, query, documents, top_n}`` → ``{results: [{index, relevance_score}]}``.
How the Qwen3 instruction travels is the ``format`` (``WINNOW_RERANK_REMOTE_FORMAT``):

- ``winnow``: raw query and documents plus an ``instruction`` field (Winnow's ``/v1/rerank``), so the
  remote builds the card's prompt itself — exact for every instruction.
- ``qwen3-formatted``: the query side is ``format_query`` (prefix + instruction + query) and each
  document ``format_document`` (document + suffix), as in the model card's vLLM example. ``vllm serve``
  started *without* ``--chat-template`` scores the concatenation of the two sides, which is exactly
  ``format_pair`` — exact for every instruction (documents must fit the server's ``--max-model-len``:
  the server does not cut them the way the card does).
- ``cohere``: raw query and documents only. The remote applies its own template (``vllm serve
  --chat-template qwen3_reranker.jinja``), which knows only the default instruction, so a custom
  instruction is refused (:class:`InstructionNotSupported`) rather than silently dropped.

``vllm serve`` does not cut a long document the way the card does: it answers 400 for a prompt over
``--max-model-len``. With a tokenizer (``WINNOW_RERANK_TOKENIZER``, by default the model's for the
``qwen3-formatted`` and ``cohere`` formats) documents are cut here by the card's rule to
``WINNOW_RERANK_MAX_LENGTH`` tokens, as text that re-tokenizes to exactly the kept tokens
(:class:`pipeline.rerank.cut.DocumentCutter`, shared with the vLLM engine), so such a request is
scored like the card instead of refused. Documents that surely fit (by their UTF-8 length) never reach
the tokenizer; the others are cut in a worker thread, off the event loop.

One pooled ``aiohttp.ClientSession`` per event loop, bodies encoded and decoded with orjson: on
loopback this client adds 0.6-0.7 ms per 20-document call where httpx added 1.9-3.3 ms
(docs/benchmarks.md, "Remote reranker hop"), and the hop is the whole cost of this backend. Every
``score()`` call has one deadline (``WINNOW_RERANK_REMOTE_TIMEOUT``) that bounds its retries too.
Connection errors, 429 and 502-504 are retried with exponential backoff and jitter (429/503 honour
``Retry-After``); past the deadline or the retries the call raises :class:`RerankerUnavailable`.
Other 4xx raise :class:`RerankerError` at once. A circuit breaker
(:class:`pipeline.breaker.Breaker`, ``WINNOW_RERANK_REMOTE_BREAKER_*``) opens after consecutive failed
calls (connection errors, timeouts, 502-504) across all URLs: requests then get
:class:`RerankerUnavailable` in microseconds, without retries, and after the cool-down one request
tries the server again (its success closes the breaker, its failure reopens it). Long candidate lists go out as concurrent calls of
at most ``max_documents`` documents, and answers are mapped back by ``index`` and validated (each
index exactly once, finite scores). Several URLs (comma-separated) are used least-busy first; one
that fails is avoided until its backoff or ``Retry-After`` has passed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from pipeline.breaker import Breaker
from pipeline.rerank import (
    InstructionNotSupported,
    RerankerError,
    RerankerUnavailable,
    RerankRequest,
)
from pipeline.rerank.prompt import (
    DEFAULT_INSTRUCTION,
    format_document,
    format_query,
    resolve_instruction,
)

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.rerank.cut import DocumentCutter

log = logging.getLogger(__name__)
T = TypeVar("T")

RemoteFormat = Literal["winnow", "cohere", "qwen3-formatted"]
FORMATS: tuple[str, ...] = get_args(RemoteFormat)
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


def check_instruction(fmt: str, instruction: str | None) -> None:
    """Raise :class:`InstructionNotSupported` for a custom instruction the format cannot carry."""
    if fmt == "cohere" and resolve_instruction(instruction) != DEFAULT_INSTRUCTION:
        raise InstructionNotSupported(
            "this reranker (WINNOW_RERANK_REMOTE_FORMAT=cohere) takes no instruction: only the "
            "default one can be scored; use the format winnow or qwen3-formatted for custom "
            "instructions"
        )


def tokenizer_for(settings: Settings) -> str | None:
    """The tokenizer that cuts documents before they are sent (``WINNOW_RERANK_TOKENIZER``)."""
    name = settings.rerank_tokenizer
    if name == "none":
        return None
    if name == "auto":
        return None if settings.rerank_remote_format == "winnow" else settings.rerank_model
    return name


def build_payload(
    fmt: str,
    query: str,
    docs: Sequence[str],
    instruction: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The request body for one call; the prompt strings come from :mod:`pipeline.rerank.prompt`."""
    body: dict[str, Any]
    if fmt == "winnow":
        body = {
            "query": query,
            "documents": list(docs),
            "instruction": resolve_instruction(instruction),
        }
    elif fmt == "qwen3-formatted":
        body = {
            "query": format_query(query, instruction),
            "documents": [format_document(d) for d in docs],
        }
    elif fmt == "cohere":
        check_instruction(fmt, instruction)
        body = {"query": query, "documents": list(docs)}
    else:
        raise ValueError(f"unknown remote format {fmt!r}; expected one of {FORMATS}")
    body["top_n"] = len(docs)  # every score back (Cohere and vLLM default to all, Jina may not)
    if model is not None:
        body["model"] = model
    return body


def parse_results(payload: Any, n_docs: int) -> list[float]:
    """Scores in input order from ``{results: [{index, relevance_score, …}]}``, in any order.

    Every index must appear exactly once and every score be a finite number; anything else is a
    :class:`RerankerError` (a server answering for other documents must never reorder ours).
    """
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise RerankerError("the rerank server's answer has no `results` list")
    scores: list[float | None] = [None] * n_docs
    for item in results:
        idx = item.get("index") if isinstance(item, dict) else None
        score = item.get("relevance_score") if isinstance(item, dict) else None
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n_docs:
            raise RerankerError(f"the rerank server answered index {idx!r} for {n_docs} documents")
        if scores[idx] is not None:
            raise RerankerError(f"the rerank server answered index {idx} twice")
        if (
            not isinstance(score, (int, float))
            or isinstance(score, bool)
            or not math.isfinite(score)
        ):
            raise RerankerError(f"the rerank server answered score {score!r} for index {idx}")
        scores[idx] = float(score)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RerankerError(
            f"the rerank server left out {len(missing)} of {n_docs} documents (e.g. {missing[:5]})"
        )
    return [s for s in scores if s is not None]


def _loads(content: bytes) -> Any:
    """orjson, and the stdlib's lenient parser when it refuses: a server that writes ``NaN`` (Python's
    ``json.dumps`` does) then gets the precise "score nan" error from :func:`parse_results`."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


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


def describe_refusal(status: int, content: bytes, url: str, model: str | None) -> str:
    """An operator-facing message for a 4xx (it names the URL and settings to fix)."""
    detail = ""
    try:
        body = _loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        msg = msg if msg is not None else body.get("message", body.get("detail"))
        detail = str(msg)[:300] if msg is not None else ""
    hint = {
        401: "the key was refused (WINNOW_RERANK_API_KEY)",
        403: "the key was refused (WINNOW_RERANK_API_KEY)",
        404: f"no rerank endpoint there, or unknown model {model!r} (WINNOW_RERANK_URL, "
        "WINNOW_RERANK_REMOTE_MODEL)",
        413: "too many documents per call (lower WINNOW_RERANK_REMOTE_MAX_DOCUMENTS)",
    }.get(status, "the request was refused")
    return f"rerank server {url} answered {status}: {hint}" + (f" ({detail})" if detail else "")


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


async def _all_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
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


class RemoteReranker:
    """The Reranker protocol over HTTP; see the module docstring for formats, retries and limits."""

    backend = "remote"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str,
        remote_model: str | None = None,
        api_key: str | None = None,
        fmt: str = "winnow",
        timeout: float = 10.0,
        max_documents: int = 128,
        retries: int = 3,
        max_concurrency: int = 8,
        health_timeout: float = HEALTH_TIMEOUT_S,
        tokenizer: str | None = None,
        max_length: int = 8192,
        breaker_failures: int = 3,
        breaker_cooldown: float = 2.0,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"WINNOW_RERANK_REMOTE_FORMAT: {fmt!r} is not one of {FORMATS}")
        self.endpoints = [Endpoint(u) for u in split_urls(urls)]
        self.model = model
        self.remote_model = remote_model
        self.format = fmt
        self.timeout = timeout
        self.max_documents = max(1, max_documents)
        self.retries = max(0, retries)
        self.max_concurrency = max(1, max_concurrency)
        self.health_timeout = min(health_timeout, timeout)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.served_model: str | None = None  # the `model` the last answer named
        # Moves when the server may have restarted or changed its model (unreachable, 502-504, a
        # failed /health probe, another `model` answered): the score cache is dropped then.
        self.epoch = 0
        self._cutter: DocumentCutter | None = None
        self._api_key = api_key
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rr = 0
        self._counters = dict.fromkeys(
            (
                "rerank_requests",
                "rerank_pairs",
                "remote_calls",
                "remote_retries",
                "remote_errors",
                "remote_unavailable",
                "remote_latency_seconds_count",
            ),
            0,
        )
        self._latency_sum = 0.0
        # failed calls in a row (unreachable, timed out, 502-504) open it: then requests get 503 at
        # once instead of paying the retries; after the cool-down one request tries again
        self.breaker = Breaker(
            "rerank_remote",
            threshold=breaker_failures,
            cooldown=breaker_cooldown,
            trial_timeout=timeout + 1.0,  # the trial request's whole deadline
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteReranker:
        if settings.rerank_url is None:
            raise ValueError(
                "WINNOW_RERANK_BACKEND=remote needs WINNOW_RERANK_URL "
                "(e.g. http://reranker:8000/v1/rerank or another Winnow's /v1/rerank)"
            )
        key = settings.rerank_api_key
        remote_model = settings.rerank_remote_model
        return cls(
            settings.rerank_url,
            model=remote_model if remote_model is not None else settings.rerank_model,
            remote_model=remote_model,
            api_key=key.get_secret_value() if key is not None else None,
            fmt=settings.rerank_remote_format,
            timeout=settings.rerank_remote_timeout,
            max_documents=settings.rerank_remote_max_documents,
            retries=settings.rerank_remote_retries,
            tokenizer=tokenizer_for(settings),
            max_length=settings.rerank_max_length,
            breaker_failures=settings.rerank_remote_breaker_failures,
            breaker_cooldown=settings.rerank_remote_breaker_cooldown,
        )

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def load(self) -> None:
        """Load the tokenizer that cuts documents, if any (blocking; the HTTP client is created in
        the event loop that first uses it). A tokenizer that cannot be had fails here, at start-up."""
        if self.tokenizer is not None and self._cutter is None:
            from transformers import AutoTokenizer

            from pipeline.model_files import resolve_tokenizer
            from pipeline.rerank.cut import DocumentCutter

            path = resolve_tokenizer(self.tokenizer, setting="WINNOW_RERANK_TOKENIZER")
            self._cutter = DocumentCutter(AutoTokenizer.from_pretrained(path), self.max_length)
        log.info(
            "remote reranker: %s (format %s, %.1fs deadline, %d documents per call, %s)",
            ", ".join(self.urls),
            self.format,
            self.timeout,
            self.max_documents,
            f"documents cut to {self.max_length} tokens by {self.tokenizer}'s tokenizer"
            if self._cutter is not None
            else "documents sent uncut",
        )

    async def _cut(self, query: str, docs: Sequence[str], instruction: str | None) -> list[str]:
        """Documents cut by the card's rule (see the module docstring); as given without a cutter."""
        cutter = self._cutter
        if cutter is None:
            return list(docs)
        request = RerankRequest(query, docs, instruction)
        if cutter.fits_uncut(request):
            return list(docs)
        return (await asyncio.to_thread(cutter.cut, request, count=False)).docs

    def _http(self) -> aiohttp.ClientSession:
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

    def _pick(self) -> tuple[Endpoint, float]:
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

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        if not docs:
            return []
        check_instruction(self.format, instruction)  # refused before any work
        if not self.breaker.allow():
            self._counters["remote_unavailable"] += 1
            wait = self.breaker.retry_after()
            raise RerankerUnavailable(
                f"rerank server kept failing: calls refused for {wait:.1f}s more (circuit open)",
                retry_after=max(1.0, wait),
            )
        docs = await self._cut(query, docs, instruction)
        m = self.max_documents
        # built up front: an unsupported instruction is refused before any network call
        payloads = [
            (
                orjson.dumps(
                    build_payload(
                        self.format, query, docs[i : i + m], instruction, self.remote_model
                    )
                ),
                len(docs[i : i + m]),
            )
            for i in range(0, len(docs), m)
        ]
        self._counters["rerank_requests"] += 1
        self._counters["rerank_pairs"] += len(docs)
        deadline = time.monotonic() + self.timeout
        client = self._http()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(payload: bytes, n: int) -> list[float]:
            async with gate:
                return await self._call(client, payload, n, deadline)

        try:
            parts = await asyncio.wait_for(
                _all_or_cancel([one(p, n) for p, n in payloads]), self.timeout
            )
        except asyncio.TimeoutError:
            self._counters["remote_unavailable"] += 1
            self.breaker.failure()
            raise RerankerUnavailable(
                f"the rerank server did not answer within {self.timeout:g}s "
                "(WINNOW_RERANK_REMOTE_TIMEOUT)",
                retry_after=1.0,
            ) from None
        except RerankerUnavailable:
            self._counters["remote_unavailable"] += 1
            raise
        return [s for part in parts for s in part]

    async def _call(
        self, client: aiohttp.ClientSession, payload: bytes, n: int, deadline: float
    ) -> list[float]:
        """One chunk, with retries; raises RerankerUnavailable when out of retries or time."""
        attempt = 0
        last = "no attempt made"
        while True:
            ep, wait = self._pick()
            remaining = deadline - time.monotonic()
            if wait >= remaining:
                raise RerankerUnavailable(
                    f"rerank server unavailable ({last}); the next try would miss the "
                    f"{self.timeout:g}s deadline",
                    retry_after=max(1.0, wait),
                )
            if wait > 0:
                await asyncio.sleep(wait)
                remaining = deadline - time.monotonic()
            ep.inflight += 1
            self._counters["remote_calls"] += 1
            t0 = time.perf_counter()
            try:
                async with client.post(
                    ep.url, data=payload, timeout=aiohttp.ClientTimeout(total=remaining)
                ) as resp:
                    status, content = resp.status, await resp.read()
                    retry_after = resp.headers.get("Retry-After")
            except TRANSPORT_ERRORS as exc:
                self._counters["remote_errors"] += 1
                self.epoch += 1
                ep.failed()
                self.breaker.failure()
                last = f"{ep.url}: {type(exc).__name__}"
            else:
                self._counters["remote_latency_seconds_count"] += 1
                self._latency_sum += time.perf_counter() - t0
                if status in (502, 503, 504):  # a balancer with no live server behind it
                    self.breaker.failure()
                else:  # an answer (a refusal, or 429: busy, but there)
                    self.breaker.success()
                if status == 200:
                    ep.succeeded()
                    try:
                        data = _loads(content)
                    except ValueError:
                        self._counters["remote_errors"] += 1
                        raise RerankerError(f"rerank server {ep.url} answered non-JSON") from None
                    if isinstance(data, dict) and isinstance(data.get("model"), str):
                        if self.served_model not in (None, data["model"]):
                            self.epoch += 1
                        self.served_model = data["model"]
                    try:
                        return parse_results(data, n)
                    except RerankerError:
                        self._counters["remote_errors"] += 1
                        raise
                self._counters["remote_errors"] += 1
                if status not in RETRY_STATUS:
                    raise RerankerError(
                        describe_refusal(status, content, ep.url, self.remote_model), status
                    )
                if status != 429:  # 502-504: a balancer with no live server behind it
                    self.epoch += 1
                ep.failed(parse_retry_after(retry_after))
                last = f"{ep.url} answered {status}"
            finally:
                ep.inflight -= 1
            if attempt >= self.retries or self.breaker.state != "closed":
                wait = max(ep.down_until - time.monotonic(), self.breaker.retry_after())
                raise RerankerUnavailable(
                    f"rerank server unavailable after {attempt + 1} attempts ({last})",
                    retry_after=max(1.0, wait),
                )
            attempt += 1
            self._counters["remote_retries"] += 1
            log.debug("rerank retry %d: %s", attempt, last)

    async def health(self) -> bool:
        """True when at least one rerank server answers ``GET /health`` (404/405 count as up: a
        hosted API without that route still answers HTTP). Bounded by a short timeout."""
        client = self._http()

        async def probe(ep: Endpoint) -> bool:
            try:
                async with client.get(
                    ep.health_url, timeout=aiohttp.ClientTimeout(total=self.health_timeout)
                ) as resp:
                    status = resp.status
            except TRANSPORT_ERRORS:
                self.epoch += 1
                return False
            ok = status < 300 or status in (404, 405)
            if ok and ep.failures:
                ep.succeeded()  # back: stop avoiding it before its backoff ends
            if ok:
                self.breaker.success()  # a probe that got an answer: no need to wait the cool-down
            return ok

        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(probe(e) for e in self.endpoints)), self.health_timeout + 0.5
            )
        except asyncio.TimeoutError:
            return False
        return any(results)

    def document_cutter(self) -> DocumentCutter | None:
        """The client-side cutter (windows of long documents), when a tokenizer is configured."""
        return self._cutter

    async def affordable(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        budget_s: float = math.inf,
        free: Sequence[bool] | None = None,
    ) -> int:
        """All of them: the remote has no cost model here; its calls keep their own deadline."""
        return len(docs)

    def stats(self) -> dict[str, int | float]:
        """Plain counters for /metrics (read at scrape time)."""
        return {
            **self._counters,
            "remote_latency_seconds_sum": self._latency_sum,
            "remote_inflight": sum(e.inflight for e in self.endpoints),
            **self.breaker.stats(),
        }

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            await client.close()
