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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson

from pipeline.breaker import Breaker
from pipeline.rerank.backends.remote.client import (
    HEALTH_TIMEOUT_S,
    RETRY_STATUS,
    TRANSPORT_ERRORS,
    Endpoint,
    EndpointPool,
    all_or_cancel,
    parse_retry_after,
    split_urls,
)
from pipeline.rerank.backends.remote.formats import (
    FORMATS,
    build_payload,
    check_instruction,
    describe_refusal,
    loads,
    parse_results,
)
from pipeline.rerank.base import (
    Reranker,
    RerankerError,
    RerankerUnavailable,
    RerankRequest,
    Sample,
    Stats,
    counter,
    gauge,
)

if TYPE_CHECKING:
    from pipeline.config import RerankSettings
    from pipeline.rerank.cut import DocumentCutter

log = logging.getLogger(__name__)


def tokenizer_for(settings: RerankSettings) -> str | None:
    """The tokenizer that cuts documents before they are sent (``WINNOW_RERANK_TOKENIZER``)."""
    name = settings.rerank_tokenizer
    if name == "none":
        return None
    if name == "auto":
        return None if settings.rerank_remote_format == "winnow" else settings.rerank_model
    return name


@dataclass
class RemoteStats(Stats):
    """What the remote reranker counts (its breaker's state is exported by the breaker)."""

    requests: int = counter("rerank_requests", "rerank requests sent to the remote reranker")
    pairs: int = counter("rerank_pairs", "query-document pairs scored by the remote reranker")
    calls: int = counter("remote_calls", "HTTP calls to the remote reranker")
    retries: int = counter("remote_retries", "remote reranker calls retried")
    errors: int = counter("remote_errors", "remote reranker calls that failed")
    unavailable: int = counter(
        "remote_unavailable", "requests answered 503 because the remote reranker was down"
    )
    latency_sum: float = counter(
        "remote_latency_seconds_sum", "seconds spent in remote reranker calls", default=0.0
    )
    latency_count: int = counter("remote_latency_seconds_count", "remote reranker calls timed")
    inflight: int = gauge(
        "remote_inflight", "remote reranker calls in flight", name="winnow_rerank_remote_inflight"
    )


class RemoteReranker(Reranker):
    """The Reranker contract over HTTP; see the module docstring for formats, retries and limits."""

    backend = "remote"
    # Moves when the server may have restarted or changed its model (unreachable, 502-504, a
    # failed /health probe, another `model` answered): the score cache is dropped then.
    epoch: int = 0  # type: ignore[assignment]

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
        self.pool = EndpointPool(split_urls(urls), api_key, timeout)
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
        self.epoch = 0
        self._cutter: DocumentCutter | None = None
        self.counters = RemoteStats()  # read by /metrics at scrape time
        # failed calls in a row (unreachable, timed out, 502-504) open it: then requests get 503 at
        # once instead of paying the retries; after the cool-down one request tries again
        self.breaker = Breaker(
            "rerank_remote",
            threshold=breaker_failures,
            cooldown=breaker_cooldown,
            trial_timeout=timeout + 1.0,  # the trial request's whole deadline
        )

    @classmethod
    def from_settings(cls, settings: RerankSettings) -> RemoteReranker:
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
        return self.pool.urls

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.pool.endpoints

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

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        if not docs:
            return []
        check_instruction(self.format, instruction)  # refused before any work
        if not self.breaker.allow():
            self.counters.unavailable += 1
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
        self.counters.requests += 1
        self.counters.pairs += len(docs)
        deadline = time.monotonic() + self.timeout
        client = self.pool.session()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(payload: bytes, n: int) -> list[float]:
            async with gate:
                return await self._call(client, payload, n, deadline)

        try:
            parts = await asyncio.wait_for(
                all_or_cancel([one(p, n) for p, n in payloads]), self.timeout
            )
        except asyncio.TimeoutError:
            self.counters.unavailable += 1
            self.breaker.failure()
            raise RerankerUnavailable(
                f"the rerank server did not answer within {self.timeout:g}s "
                "(WINNOW_RERANK_REMOTE_TIMEOUT)",
                retry_after=1.0,
            ) from None
        except RerankerUnavailable:
            self.counters.unavailable += 1
            raise
        return [s for part in parts for s in part]

    async def _call(
        self, client: aiohttp.ClientSession, payload: bytes, n: int, deadline: float
    ) -> list[float]:
        """One chunk, with retries; raises RerankerUnavailable when out of retries or time."""
        attempt = 0
        last = "no attempt made"
        while True:
            ep, wait = self.pool.pick()
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
            self.counters.calls += 1
            t0 = time.perf_counter()
            try:
                async with client.post(
                    ep.url, data=payload, timeout=aiohttp.ClientTimeout(total=remaining)
                ) as resp:
                    status, content = resp.status, await resp.read()
                    retry_after = resp.headers.get("Retry-After")
            except TRANSPORT_ERRORS as exc:
                self.counters.errors += 1
                self.epoch += 1
                ep.failed()
                self.breaker.failure()
                last = f"{ep.url}: {type(exc).__name__}"
            else:
                self.counters.latency_count += 1
                self.counters.latency_sum += time.perf_counter() - t0
                if status in (502, 503, 504):  # a balancer with no live server behind it
                    self.breaker.failure()
                else:  # an answer (a refusal, or 429: busy, but there)
                    self.breaker.success()
                if status == 200:
                    ep.succeeded()
                    try:
                        data = loads(content)
                    except ValueError:
                        self.counters.errors += 1
                        raise RerankerError(f"rerank server {ep.url} answered non-JSON") from None
                    if isinstance(data, dict) and isinstance(data.get("model"), str):
                        if self.served_model not in (None, data["model"]):
                            self.epoch += 1
                        self.served_model = data["model"]
                    try:
                        return parse_results(data, n)
                    except RerankerError:
                        self.counters.errors += 1
                        raise
                self.counters.errors += 1
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
            self.counters.retries += 1
            log.debug("rerank retry %d: %s", attempt, last)

    async def health(self) -> bool:
        """True when at least one rerank server answers ``GET /health`` (404/405 count as up: a
        hosted API without that route still answers HTTP). Bounded by a short timeout."""
        client = self.pool.session()

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

    def samples(self) -> list[Sample]:
        """Its counters (read at scrape time) and its cutter's, when it cuts documents."""
        self.counters.inflight = sum(e.inflight for e in self.endpoints)
        cut = list(self._cutter.counters.samples()) if self._cutter is not None else []
        return [*self.counters.samples(), *cut]

    def stats(self) -> dict[str, int | float]:
        """The counters, and the breaker's state (exported by the breaker's own families)."""
        return {**super().stats(), **self.breaker.stats()}

    async def aclose(self) -> None:
        await self.pool.aclose()
