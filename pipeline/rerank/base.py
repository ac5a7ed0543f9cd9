"""The reranker contract: what search and the API call, what engines implement, and typed stats.

Two abstract classes, each with its optional capabilities as methods with defaults here, so no caller
probes a reranker with ``getattr``:

- :class:`RerankEngine`: a synchronous scorer run in one worker thread (transformers, vLLM,
  ``testkit.fake_engine``); it may merge pairs of several requests. The batcher sits in front of it.
- :class:`Reranker`: the async scorer search and the API call (the batched engine, the score cache,
  a remote /rerank server).

Counters are typed (:mod:`pipeline.rerank.stats`): a :class:`Stats` dataclass per component, each
field declared with :func:`counter` or :func:`gauge`, which name its Prometheus metric and help text. ``/metrics`` exports
a reranker's :meth:`Reranker.samples` as they are declared (no list of names elsewhere), and a test
iterates the declarations to check each one reaches ``/metrics``.

This module imports no backend; heavy imports (torch, transformers, vllm, aiohttp) happen inside the
backends (``pipeline.rerank.backends``), which the factory (``pipeline.rerank.factory``) picks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.rerank.prompt import RerankRequest
from pipeline.rerank.stats import Metric, Sample, Stats, counter, declared_metrics, gauge

if TYPE_CHECKING:
    from pipeline.rerank.cut import DocumentCutter

__all__ = [
    "EngineStats",
    "InstructionNotSupported",
    "Metric",
    "RerankEngine",
    "RerankRequest",
    "Reranker",
    "RerankerError",
    "RerankerUnavailable",
    "Sample",
    "Stats",
    "counter",
    "declared_metrics",
    "gauge",
]


class RerankerUnavailable(RuntimeError):
    """The reranker could not answer within the call's deadline (answered 503, with Retry-After).

    Raised by the remote backend when the server is unreachable or overloaded past its retries;
    the next call tries again, so service recovers by itself once the reranker is back.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RerankerError(RuntimeError):
    """The remote reranker refused a request (4xx other than 429) or sent an invalid answer (502).

    Not retried: the same request would fail the same way. ``status`` is the remote's HTTP status
    (None for an invalid answer).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InstructionNotSupported(ValueError):
    """A custom instruction was asked of a remote that cannot carry one (answered 422)."""


@dataclass
class EngineStats(Stats):
    """What every engine counts; engines subclass it with their own counters."""

    requests_scored: int = counter(
        "rerank_engine_requests", "requests (or slices of them) scored by the engine"
    )
    pairs_scored: int = counter("rerank_engine_pairs", "pairs scored by the engine")
    tokens_scored: int = counter(
        "rerank_tokens", "tokens run through the reranker (padding excluded)"
    )
    forward_passes: int = counter(
        "rerank_forward_passes", "reranker forward passes (vLLM: LLM.score calls)"
    )
    batches: int = counter("rerank_engine_calls", "engine calls (score_requests)")


# --- the contracts ----------------------------------------------------------------------------------
class RerankEngine(ABC):
    """A synchronous scorer run in one worker thread; it may merge pairs of several requests.

    Constructors are cheap; :meth:`load` loads the model (idempotent, thread-safe).
    """

    backend: str = "engine"
    #: default slice / dispatch budget of the batcher, in tokens (None: the batcher's default)
    max_batch_tokens: int | None = None

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """P(yes) per document of each request, in input order."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """This engine's counters (a snapshot or the live object; read at scrape time)."""

    def samples(self) -> list[Sample]:
        """Every declared counter of this engine, for /metrics (an engine with more sources, e.g.
        its cutter's, adds them)."""
        return list(self.stats().samples())

    def score(self, query: str, docs: Sequence[str], instruction: str | None = None) -> list[float]:
        """P(yes) for each document, in input order (convenience over :meth:`score_requests`)."""
        return self.score_requests([RerankRequest(query, docs, instruction)])[0]

    def estimate_tokens(self, request: RerankRequest) -> int | None:
        """Work of ``request`` in tokens, cheaply (no tokenizer: the batcher calls it on the event
        loop per document); None = let the batcher estimate from characters."""
        return None

    def tokens_scored(self) -> int | None:
        """Tokens this engine has run so far (None: it does not count them)."""
        return int(self.stats().tokens_scored)

    def document_cutter(self) -> DocumentCutter | None:
        """The card's cut and the windows of long documents with this model's tokenizer, if any."""
        return None


class Reranker(ABC):
    """Scores in input order, each P(yes) in [0, 1]; sorting and top_n belong to SearchService."""

    backend: str
    model: str

    @abstractmethod
    def load(self) -> None:
        """Load models (blocking; call off the event loop)."""

    @abstractmethod
    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]: ...

    @abstractmethod
    def samples(self) -> list[Sample]:
        """Every declared counter and gauge with its value, for /metrics."""

    def stats(self) -> dict[str, int | float]:
        """The same numbers under their ``stats()`` keys (tests, logs, bench)."""
        return {metric.key: value for metric, value in self.samples()}

    async def score_within(
        self, query: str, docs: Sequence[str], instruction: str | None, budget_s: float
    ) -> list[float]:
        """Scores of the leading ``docs`` that finish within ``budget_s`` seconds from now: a prefix
        of them, maybe shorter, maybe empty (a search's budget, kept as it runs); ``math.inf``:
        all of them, as :meth:`score`. Default (no scheduler of its own: a remote keeps its own
        timeout): :meth:`score`, all of them."""
        return await self.score(query, docs, instruction)

    async def affordable(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        budget_s: float = math.inf,
        free: Sequence[bool] | None = None,
    ) -> int:
        """How many leading ``docs`` could be scored within ``budget_s`` seconds now, queue included
        (``free[i]``: a cache hit, no work); raises ``Overloaded`` when the queue alone is the reason
        none fit. Default (no cost model: a remote keeps its own timeout): all of them."""
        return len(docs)

    def document_cutter(self) -> DocumentCutter | None:
        """The model's tokenizer as a cutter (windows of long documents, usage); None without one."""
        return None

    async def health(self) -> bool:
        """Whether the scorer can answer now (/ready asks; a remote probes its server)."""
        return True

    @property
    def epoch(self) -> int:
        """Moves when the scores may have changed (a remote restarted or changed model): the score
        cache is dropped then. Local models never change under a running process."""
        return 0

    async def aclose(self) -> None:
        """Release what :meth:`load` or the first call opened."""
        return None
