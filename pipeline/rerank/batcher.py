"""Async micro-batcher: admission by work, slices that interleave, merged engine calls.

Every backend (transformers, vLLM) sits behind this one scheduler:

- **Work, not requests.** A request's work is estimated before it is queued, per document, in tokens
  (the engine's ``estimate_tokens`` when it has one, else :func:`estimate_pair_tokens`: characters /
  ``CHARS_PER_TOKEN`` capped by ``max_length``; no tokenizer runs on the event loop). The queue is
  bounded in tokens (``queue_tokens``) and in requests (``queue_size``); past either → ``Overloaded``.
- **Deadline, from a cost model that knows length.** Each pair's time is predicted from its estimated
  tokens by :class:`~pipeline.rerank.cost.CostModel` (``a·n + b·n²``, rates learnt per length bucket
  from every engine call, seeded by a start-up profile at two lengths), so the estimator's bias cancels
  out and one heavy request does not make short ones look slow. A request that alone would take longer
  than ``deadline_s`` is refused with ``WorkTooLarge``; one that would miss it because of the work ahead
  of it gets ``Overloaded`` with a Retry-After from the predicted seconds. :meth:`MicroBatcher.affordable`
  tells a caller how many leading documents fit a budget (``/v1/search`` reranks those).
- **A search's budget, kept as it runs.** ``submit(request, budget_s)`` sends a budgeted search in
  slices of at most 1/``BUDGET_SLICES`` of its budget (predicted), one per engine call, planned
  first in the call, with every other slice of that call no longer than its own (the share
  ``affordable`` planned with); a slice predicted, at the measured slowdown, to end past the budget
  is not started and the search gets the leading documents scored so far. A model that was
  optimistic costs at most one slice's misprediction past the budget, not the whole search's.
- **Slices, fair round-robin.** Requests are cut into slices of consecutive documents (at most
  ``slice_tokens`` each) and served round by round: each active request gets at most one slice per
  round, and a newcomer joins the current round ahead of requests already served in it. So a short
  request waits for the slice in flight, not for a long request's whole run, and a long request is
  never starved (it gets a slice every round; rounds are bounded by ``queue_size``). Round-robin was
  chosen over shortest-remaining-work-first because it needs no accurate size estimate (ours is a
  character heuristic) and no aging constant to tune, while still bounding a short request's wait.
- **Merging.** One engine call carries slices of several requests, up to a dispatch budget of
  ``slice_tokens`` estimated tokens (and ``max_pairs_per_dispatch`` pairs); the engine cuts them into
  forward passes itself. If a merged call fails, each request's part is re-run alone so one bad
  request (e.g. an oversized instruction) cannot fail the others.
- **Cancellation.** A caller that goes away cancels its future: its remaining slices are dropped at
  once (counted) and its queued tokens are released.

Model work runs in one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.rerank.base import (
    RerankEngine,
    Reranker,
    RerankRequest,
    Sample,
    Stats,
    counter,
    gauge,
)
from pipeline.rerank.cost import CostModel
from pipeline.rerank.cut import DocumentCutter
from pipeline.rerank.prompt import BODY_TEMPLATE, PREFIX, SUFFIX, resolve_instruction

if TYPE_CHECKING:
    from pipeline.config import RerankSettings

log = logging.getLogger(__name__)

# Heuristic tokens per pair before anything is tokenized: Qwen's BPE averages ~4.2 characters per
# token on English prose and fewer on code, numbers and most other scripts; 3 errs on the side of more
# work. Only relative sizes matter for scheduling: throughput is measured in these same units.
CHARS_PER_TOKEN = 3.0
TEMPLATE_CHARS = (
    len(PREFIX) + len(SUFFIX) + len(BODY_TEMPLATE.format(instruction="", query="", doc=""))
)
# Slices (and so engine calls) hold at least this many tokens unless the setting says otherwise: an
# engine whose forwards are smaller (hf on CPU) cuts them itself, and each request's head runs once per
# call, so a smaller call would only repeat heads and dispatch overhead.
DEFAULT_SLICE_TOKENS = 8192
# Used until the first measurement (BatchedReranker.load() calibrates at once): the real
# Qwen3-Reranker-0.6B runs ~95-110 tokens/s on a 2-core CPU (docs/benchmarks.md), a GPU far more.
START_TOKENS_PER_S = 100.0
UNCAPPED = 1 << 62
RATE_HALF_LIFE_TOKENS = 65536.0  # older dispatches weigh half after this much newer work
# The start-up profile: long pairs from PROFILE_MIN_TOKENS, doubling to the pair limit while the next
# is predicted to end within PROFILE_SECONDS of the start (the first long pair always runs).
PROFILE_SECONDS = 4.0
PROFILE_MIN_TOKENS = 512
# A search's rerank budget is enforced while it runs: its documents go to the engine in slices of at
# most 1/BUDGET_SLICES of the budget (predicted), one slice per engine call, and a slice predicted (at
# the measured slowdown) to end past the budget is not started. So a search that runs slower than its
# plan overruns by at most the misprediction of one slice, and answers with the documents scored.
BUDGET_SLICES = 4
CALIBRATION_TEXT = "calibration text for the reranker scheduler"


class Overloaded(RuntimeError):
    """Too much work queued (tokens, requests or deadline): answer 429 with ``Retry-After``.

    ``message`` is safe to send to the client.
    """

    def __init__(self, retry_after: float, message: str = "the reranker queue is full") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class WorkTooLarge(ValueError):
    """One request is more work than the reranker accepts at all: answer 413 (split it).

    ``message`` is safe to send to the client; ``tokens`` is the request's estimated work and
    ``limit`` the most this server accepts in one request (both in estimated tokens).
    """

    def __init__(self, message: str, *, tokens: int, limit: int) -> None:
        super().__init__(message)
        self.message = message
        self.tokens = tokens
        self.limit = limit


class DeadlineExceeded(RuntimeError):
    """An admitted request ran slower than its cost model predicted and cannot finish within the
    deadline: the rest of it is not started, and the answer is 503 with ``Retry-After``, at the
    deadline, not after it. ``message`` is safe to send to the client."""

    def __init__(self, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


def estimate_pair_tokens(request: RerankRequest, max_length: int) -> list[int]:
    """Estimated tokens of each (query, document) pair: characters / CHARS_PER_TOKEN, capped."""
    fixed = TEMPLATE_CHARS + len(resolve_instruction(request.instruction)) + len(request.query)
    return [min(max_length, math.ceil((fixed + len(d)) / CHARS_PER_TOKEN)) for d in request.docs]


@dataclass
class BatcherStats(Stats):
    """The batcher's counters; the queue gauges are filled in by :meth:`MicroBatcher.counters`."""

    requests: int = counter("rerank_requests", "rerank requests submitted to the batcher")
    dispatches: int = counter("rerank_dispatches", "engine calls made by the batcher")
    merged_dispatches: int = counter(
        "rerank_merged_dispatches", "engine calls that merged several requests"
    )
    max_requests_per_dispatch: int = gauge(
        "rerank_max_requests_per_dispatch", "most requests merged into one engine call so far"
    )
    slices: int = counter("rerank_slices", "slices of requests dispatched to the engine")
    pairs: int = counter("rerank_pairs", "query-document pairs scored")
    estimated_tokens: int = counter(
        "rerank_estimated_tokens", "estimated tokens admitted (the unit of admission)"
    )
    dropped: int = counter("rerank_dropped", "requests dropped because their client went away")
    dropped_pairs: int = counter(
        "rerank_dropped_pairs", "pairs dropped because their client went away"
    )
    # Overloaded: queue full (requests or tokens) or deadline because of the queue
    rejected: int = counter("rerank_rejected", "requests rejected with 429 (queue full)")
    refused_deadline: int = counter(
        "rerank_refused_deadline", "requests refused up front: they could not meet the deadline"
    )
    too_large: int = counter(
        "rerank_too_large", "requests refused with 413: more work than one request may carry"
    )
    failed: int = counter("rerank_failed", "requests whose scoring failed")
    deadline_missed: int = counter(
        "rerank_deadline_missed",
        "requests admitted, then answered 503 at the deadline: they ran slower than predicted",
    )
    budget_cut: int = counter(
        "rerank_budget_cut",
        "searches answered with fewer candidates reranked than planned: they ran slower than "
        "predicted, and the rest would have ended past their budget",
    )
    budget_cut_pairs: int = counter(
        "rerank_budget_cut_pairs", "planned pairs not scored because a search's budget ran out"
    )
    last_dispatch_s: float = gauge(
        "rerank_last_dispatch_seconds", "seconds of the last engine call", default=0.0
    )
    last_dispatch_pairs: int = gauge(
        "last_dispatch_pairs", "pairs in the last dispatch", name="winnow_rerank_last_batch_pairs"
    )
    last_dispatch_tokens: int = gauge(
        "last_dispatch_tokens", "tokens in the last call", name="winnow_rerank_last_batch_tokens"
    )
    queue_depth: int = gauge(
        "queue_depth", "requests waiting for the reranker", name="winnow_rerank_queue_depth"
    )
    queue_tokens: int = gauge(
        "queue_tokens", "estimated tokens waiting", name="winnow_rerank_queue_tokens"
    )
    queue_seconds: float = gauge(
        "queue_seconds",
        "predicted seconds of rerank work waiting or running (the cost model)",
        name="winnow_rerank_queue_seconds",
        default=0.0,
    )
    tokens_per_s: float = gauge("rerank_tokens_per_s", "measured throughput", default=0.0)
    dispatch_sizes: list[int] = field(default_factory=list)  # pairs of the last 100 dispatches


@dataclass(eq=False)
class _Job:
    request: RerankRequest
    est: list[int]
    future: asyncio.Future[list[float]]
    seq: int
    lens: list[float]  # the cost model's length of each pair
    cost: list[float]  # predicted seconds per document (at admission)
    scores: list[float]
    pending: int  # pairs not scored yet
    waiting_tokens: int  # estimated tokens not dispatched yet
    waiting_seconds: float  # predicted seconds of the documents not dispatched yet
    next_doc: int = 0  # first document not dispatched yet
    rounds: int = 0  # round-robin rounds served
    last_served: float = -1.0  # dispatch number of its last slice (newcomers: just before)
    expires: float | None = None  # time.monotonic() by which it must be answered (the deadline)
    # a search's budget: by then it is answered with the leading documents scored (None: all of them)
    budget_expires: float | None = None
    slice_seconds: float = (
        math.inf
    )  # predicted seconds per slice at most (budgeted: 1/BUDGET_SLICES)
    slowdown: float = 1.0  # measured / predicted seconds of its last engine call


@dataclass(slots=True)
class _Part:
    job: _Job
    start: int
    stop: int
    tokens: int
    seconds: float  # predicted


class MicroBatcher:
    """Schedules rerank requests onto one engine; see the module docstring for the policy.

    ``queue_tokens`` / ``deadline_s`` ``None`` = no such bound; ``slice_tokens`` ``None`` = the engine's
    ``max_batch_tokens`` when it has one, at least ``DEFAULT_SLICE_TOKENS``.
    """

    def __init__(
        self,
        engine: RerankEngine,
        *,
        max_wait_ms: float = 2.0,
        queue_size: int = 64,
        queue_tokens: int | None = None,
        slice_tokens: int | None = None,
        deadline_s: float | None = None,
        max_length: int = 8192,
        max_pairs_per_dispatch: int = 512,
        max_requests_per_dispatch: int | None = None,
        start_tokens_per_s: float = START_TOKENS_PER_S,
    ) -> None:
        self.engine = engine
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.queue_tokens = queue_tokens
        self._slice_tokens = slice_tokens
        self.deadline_s = deadline_s if deadline_s else None
        self.max_length = max_length
        self.max_pairs = max_pairs_per_dispatch
        self.max_requests = max_requests_per_dispatch  # None = no limit; 1 = no merging
        self.start_tokens_per_s = start_tokens_per_s
        self.cost = CostModel(start_tokens_per_s)
        self.stats = BatcherStats()
        self._rate_tokens = 0.0  # decayed sums behind tokens_per_s
        self._rate_seconds = 0.0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="winnow-rerank")
        # engine tokens per estimated token, measured by the profile (the cost model's unit)
        self.token_scale = 1.0
        self._reset()

    @classmethod
    def from_settings(
        cls, engine: RerankEngine, settings: RerankSettings, **override: Any
    ) -> MicroBatcher:
        """The batcher as the reranker's settings group says (``override`` for benchmarks)."""
        kw: dict[str, Any] = {
            "max_wait_ms": settings.rerank_max_wait_ms,
            "queue_size": settings.rerank_queue_size,
            "queue_tokens": settings.rerank_queue_tokens,
            "slice_tokens": settings.rerank_slice_tokens,
            "deadline_s": settings.rerank_deadline_s,
            "max_length": settings.rerank_max_length,
        }
        return cls(engine, **{**kw, **override})

    # --- state --------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._ring: list[_Job] = []  # admitted jobs with documents not dispatched yet
        self._jobs: set[_Job] = set()  # admitted, unfinished
        self._waiting_tokens = 0
        self._inflight_seconds = 0.0
        self._seq = 0
        self._dispatch_no = 0

    def _raw_estimate(self, request: RerankRequest) -> list[int]:
        """Uncapped estimated tokens per pair (the pair limit is applied by the callers): the
        engine's estimate when it has one, else characters / ``CHARS_PER_TOKEN``."""
        out = []
        for doc in request.docs:
            n = self.engine.estimate_tokens(
                RerankRequest(request.query, [doc], request.instruction)
            )
            if n is None:
                return estimate_pair_tokens(request, UNCAPPED)
            out.append(int(n))
        return out

    def _estimate(self, request: RerankRequest) -> list[int]:
        """Estimated tokens per pair, capped by the pair limit: the unit of the queue bounds."""
        return [min(self.max_length, n) for n in self._raw_estimate(request)]

    def work(self, request: RerankRequest) -> tuple[list[int], list[float]]:
        """(estimated tokens, the cost model's lengths) per pair.

        The lengths are the engine's tokens as the profile measured them against the estimate, and
        capped where the engine caps: the character heuristic over-counts prose by ~1.5-2× below the
        cap but not at it, so estimated tokens alone would make capped pairs look cheap.
        """
        raw = self._raw_estimate(request)
        cap = self.max_length
        return [min(cap, n) for n in raw], [min(cap, n * self.token_scale) for n in raw]

    @property
    def slice_tokens(self) -> int:
        if self._slice_tokens is not None:
            return self._slice_tokens
        budget = self.engine.max_batch_tokens
        return max(budget if budget is not None else 0, DEFAULT_SLICE_TOKENS)

    @property
    def depth(self) -> int:
        """Requests admitted and not finished (waiting or partly dispatched)."""
        return len(self._jobs)

    @property
    def waiting_tokens(self) -> int:
        """Estimated tokens queued and not dispatched yet."""
        return self._waiting_tokens

    @property
    def waiting_seconds(self) -> float:
        """Predicted seconds of the work queued and not dispatched yet."""
        return sum(j.waiting_seconds for j in self._ring)

    @property
    def inflight_seconds(self) -> float:
        """Predicted seconds of the engine call running now (0 when idle)."""
        return self._inflight_seconds

    @property
    def tokens_per_s(self) -> float:
        """Measured throughput in estimated tokens per second over all lengths (for /metrics; the
        deadline uses the cost model, which knows length)."""
        if self._rate_seconds <= 0:
            return self.start_tokens_per_s
        return max(self._rate_tokens / self._rate_seconds, 1e-3)

    def measure(self, tokens: int, seconds: float) -> None:
        """Fold one dispatch into the throughput estimate (token-weighted, decayed by newer work)."""
        if tokens <= 0 or seconds <= 0:
            return
        decay = 0.5 ** (tokens / RATE_HALF_LIFE_TOKENS)
        self._rate_tokens = self._rate_tokens * decay + tokens
        self._rate_seconds = self._rate_seconds * decay + seconds

    def calibrate(self) -> float:
        """Profile the engine at several pair lengths, synchronously (call off the loop, after load).

        Seeds the cost model so the first request is not judged by a guess: a one-pair warm-up (the
        first call pays one-off library and kernel set-up), a short request (twice when it is cheap;
        the faster counts), then single long pairs of
        :data:`PROFILE_MIN_TOKENS`, doubling up to the pair limit while the next one is predicted to
        fit what is left of :data:`PROFILE_SECONDS` (a 2-core CPU with the 0.6B model stops at 512
        tokens, ~5 s; a GPU reaches the limit in milliseconds). The first long pair also measures
        :attr:`token_scale` from the engine's ``tokens_scored`` when it counts them. Returns the
        short pairs' estimated tokens per second.
        """
        t_start = time.perf_counter()
        # one-off costs first (library init, kernel selection): not part of any pair's time
        self.engine.score_requests([RerankRequest("warm-up", ["warm-up"])])
        short = RerankRequest("calibration query", [" ".join([CALIBRATION_TEXT] * 8)] * 2, None)
        n_short = sum(self._estimate(short)) / len(short.docs)
        t_first = self._timed(short)
        fixed = self._estimate(RerankRequest("calibration query", [""]))[0]
        longs: list[tuple[float, float]] = []
        want = PROFILE_MIN_TOKENS
        while True:
            chars = int(max(1, want / self.token_scale - fixed) * CHARS_PER_TOKEN)
            doc = (CALIBRATION_TEXT + " ") * (1 + chars // (len(CALIBRATION_TEXT) + 1))
            # a query of its own per call: an engine's head cache must not make it look cheap
            long = RerankRequest(f"calibration query {len(longs) + 1}", [doc[:chars]])
            n_long = self._raw_estimate(long)[0]
            before = self._engine_tokens()
            seconds = self._timed(long)
            after = self._engine_tokens()
            if not longs and before is not None and after is not None and after > before:
                self.token_scale = min(2.0, max(0.1, (after - before) / n_long))
            length = min(self.max_length, n_long * self.token_scale)
            longs.append((length, seconds))
            if length >= self.max_length or want >= self.max_length:
                break
            want = min(self.max_length, 2 * want)
            # the next pair, at least 2× longer: at least 2× the time (4× when attention dominates)
            left = PROFILE_SECONDS - (time.perf_counter() - t_start)
            if 2 * seconds * want / length > left:
                break
        t_short = t_first
        if t_first < PROFILE_SECONDS / 4:  # cheap: run it again without the one-off warm-ups
            again = RerankRequest("calibration query again", short.docs)  # a cold head again
            t_short = min(t_first, self._timed(again))
        points = [(n_short * self.token_scale, t_short / len(short.docs)), *longs]
        a, b = self.cost.set_profile(points)
        rate = n_short * len(short.docs) / t_short
        log.info(
            "reranker profile in %.1f s: %.0f estimated tokens/s at %d; pairs of %s engine tokens "
            "in %s s; %.2f engine tokens per estimated token; line a=%.3g s, b=%.3g s per token²",
            time.perf_counter() - t_start,
            rate,
            n_short,
            [round(n) for n, _ in longs],
            [round(t, 3) for _, t in longs],
            self.token_scale,
            a,
            b,
        )
        return rate

    def _engine_tokens(self) -> int | None:
        """Tokens the engine says it ran (None when it does not count them)."""
        return self.engine.tokens_scored()

    def _timed(self, request: RerankRequest) -> float:
        """Seconds of one engine call on ``request``, counted in the throughput figure."""
        t0 = time.perf_counter()
        self.engine.score_requests([request])
        seconds = time.perf_counter() - t0
        self.measure(sum(self._estimate(request)), seconds)
        return seconds

    def counters(self) -> BatcherStats:
        """The batcher's counters with the queue gauges as they are now (engine counters are
        exported beside them by the reranker)."""
        st = self.stats
        st.queue_depth = self.depth
        st.queue_tokens = self._waiting_tokens
        st.tokens_per_s = round(self.tokens_per_s, 3)
        st.queue_seconds = round(self.waiting_seconds + self._inflight_seconds, 3)
        return st

    # --- admission ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._reset()  # a new event loop (or a dead collector): jobs of the old one are gone
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="rerank-batcher")

    def _admit(self, est: list[int], cost: list[float]) -> None:
        """Raise WorkTooLarge / Overloaded unless a request of this work can be queued now."""
        st = self.stats
        tokens, seconds = sum(est), sum(cost)
        if self.queue_tokens is not None and tokens > self.queue_tokens:
            st.too_large += 1
            raise WorkTooLarge(
                f"this request is about {tokens} tokens of reranking work; this server accepts "
                f"at most about {self.queue_tokens} per request (WINNOW_RERANK_QUEUE_TOKENS): "
                "split the documents over several requests or send shorter documents",
                tokens=tokens,
                limit=self.queue_tokens,
            )
        if self.deadline_s is not None and seconds > self.deadline_s:
            st.too_large += 1
            limit = round(tokens * self.deadline_s / seconds)
            raise WorkTooLarge(
                f"this request is about {tokens} tokens of reranking work, about {seconds:.0f} s "
                "at the measured cost of pairs of its lengths; this server accepts at most about "
                f"{limit} such tokens per request ({self.deadline_s:g} s, "
                "WINNOW_RERANK_DEADLINE_S): split the documents over several requests or send "
                "shorter documents",
                tokens=tokens,
                limit=limit,
            )
        if len(self._jobs) >= self.queue_size:
            st.rejected += 1
            ahead = (self.waiting_seconds + self._inflight_seconds) / max(1, len(self._jobs))
            raise Overloaded(self._retry_after(ahead), "the reranker queue is full")
        if self.queue_tokens is not None and self._waiting_tokens + tokens > self.queue_tokens:
            st.rejected += 1
            excess = self._waiting_tokens + tokens - self.queue_tokens
            raise Overloaded(
                self._retry_after(excess * seconds / tokens), "the reranker queue is full"
            )
        if self.deadline_s is not None:
            finish = self._finish(seconds)
            if finish > self.deadline_s:
                st.rejected += 1
                st.refused_deadline += 1
                raise Overloaded(
                    self._retry_after(finish - self.deadline_s),
                    f"the reranker is too busy to finish this request within "
                    f"{self.deadline_s:g} s (WINNOW_RERANK_DEADLINE_S)",
                )

    def _finish(self, seconds: float) -> float:
        """Predicted seconds until a newcomer of ``seconds`` of work is done.

        Round-robin: until it is done, every request ahead gets at most as much work as it does.
        """
        ahead = self._inflight_seconds + sum(min(j.waiting_seconds, seconds) for j in self._ring)
        return ahead + seconds

    def _retry_after(self, seconds: float) -> float:
        cap = self.deadline_s if self.deadline_s is not None else 60.0
        return max(1.0, min(cap, seconds))

    def affordable(
        self, request: RerankRequest, budget_s: float, free: Sequence[bool] | None = None
    ) -> int:
        """How many leading documents of ``request`` could be scored within ``budget_s`` now.

        The queue ahead counts as in :meth:`_admit` (round-robin), and so do the queue bounds and the
        deadline (the budget is at most ``deadline_s``). ``free[i]``: document ``i`` costs nothing
        (a score-cache hit). Raises ``Overloaded`` when some documents would fit an idle queue but
        none fit now: that is overload (429), not a budget too small.
        """
        est, lens = self.work(request)
        if free is not None:
            est = [0 if f else n for n, f in zip(est, free, strict=True)]
        budget = budget_s if self.deadline_s is None else min(budget_s, self.deadline_s)
        room_tokens = self.queue_tokens if self.queue_tokens is not None else math.inf
        busy_room = room_tokens - self._waiting_tokens
        alone = now = 0
        tokens = seconds = 0.0
        queue_full = len(self._jobs) >= self.queue_size
        for n, length in zip(est, lens, strict=True):
            tokens += n
            seconds += self.cost.pair_seconds(length) if n else 0.0
            if seconds > budget or tokens > room_tokens:
                break
            alone += 1
            if now == alone - 1 and (
                tokens == 0  # cache hits so far: nothing to queue
                or (not queue_full and tokens <= busy_room and self._finish(seconds) <= budget)
            ):
                now = alone
        if now == 0 and alone > 0:
            self.stats.rejected += 1
            self.stats.refused_deadline += not queue_full
            wait = self._finish(self.cost.pair_seconds(lens[0])) - budget
            raise Overloaded(
                self._retry_after(wait),
                f"the reranker is too busy to score any candidate within {budget:g} s",
            )
        return now

    async def submit(self, request: RerankRequest, budget_s: float | None = None) -> list[float]:
        """P(yes) per document of ``request``; refused up front by :meth:`_admit` when it cannot fit.

        ``budget_s`` (a search's rerank budget): the scores of the leading documents that finish
        within it, a prefix of the documents that may be shorter than them, or empty. None or
        infinite: all of them, or ``DeadlineExceeded`` at the deadline.
        """
        if not request.docs:
            return []
        self._ensure_started()
        est, lens = self.work(request)
        cost = [self.cost.pair_seconds(n) for n in lens]
        total = sum(est)
        self._admit(est, cost)
        assert self._loop is not None and self._wakeup is not None
        ring_rounds = min((j.rounds for j in self._ring), default=0)
        job = _Job(
            request=request,
            est=est,
            lens=lens,
            cost=cost,
            future=self._loop.create_future(),
            seq=self._seq,
            scores=[0.0] * len(request.docs),
            pending=len(request.docs),
            waiting_tokens=total,
            waiting_seconds=sum(cost),
            rounds=ring_rounds,  # joins the current round: after those still waiting in it,
            last_served=self._dispatch_no - 0.5,  # before those served by the call in flight
        )
        now = time.monotonic()
        job.expires = None if self.deadline_s is None else now + self.deadline_s
        if budget_s is not None and math.isfinite(budget_s):
            ends = now + max(0.0, budget_s)
            job.budget_expires = ends if job.expires is None else min(ends, job.expires)
            job.slice_seconds = max(0.0, budget_s) / BUDGET_SLICES
        self._seq += 1
        self._jobs.add(job)
        self._ring.append(job)
        self._waiting_tokens += total
        self.stats.requests += 1
        job.future.add_done_callback(lambda _f, j=job: self._finished(j))
        self._wakeup.set()
        return await job.future  # cancelling this cancels the future: _finished drops the rest

    def _finished(self, job: _Job) -> None:
        """The job's future is done (result, error or cancelled): release what it still holds."""
        if job in self._ring:
            self._ring.remove(job)
        self._waiting_tokens -= job.waiting_tokens
        self._jobs.discard(job)
        if job.future.cancelled():
            self.stats.dropped += 1
            self.stats.dropped_pairs += len(job.request.docs) - job.next_doc
        job.waiting_tokens = 0
        job.waiting_seconds = 0.0
        job.next_doc = len(job.request.docs)

    # --- dispatch -----------------------------------------------------------------------------
    def _plan(self) -> list[_Part]:
        """Cut the next engine call: round by round, one slice per request, up to the budget.

        Every job gets its scores when the whole call ends, so a slice is cut to what is predicted
        (at the jobs' measured slowdown) to end by its own deadline or budget, and by those of the
        jobs already in the call. A job whose budget leaves no room is answered with what it has
        (:meth:`_settle`), one past its deadline with 503 (:meth:`_expire`); one held back by
        another job's budget waits for the next call. A call with a search's budget in it is one
        round, planned with the budgeted searches first, and every other slice in it is at most as
        long as theirs: the round-robin share :meth:`affordable` planned the budget with.
        """
        budget, slice_max = self.slice_tokens, self.slice_tokens
        parts: dict[_Job, _Part] = {}
        used = pairs = 0
        used_seconds = 0.0  # predicted seconds of the call planned so far (at the slowdowns)
        ends_by = math.inf  # the call must end by then: the earliest deadline or budget in it
        share = math.inf  # predicted seconds of the shortest budgeted slice in the call
        now = time.monotonic()
        self._dispatch_no += 1
        progress = True
        while progress and self._ring and used < budget and pairs < self.max_pairs:
            if share < math.inf:
                break  # a budgeted search is in the call: one round
            progress = False
            order = sorted(
                self._ring,
                key=lambda j: (j.rounds, j.budget_expires is None, j.last_served, j.seq),
            )
            for job in order:
                if job.future.done():
                    continue
                if (
                    self.max_requests is not None
                    and job not in parts
                    and len(parts) >= self.max_requests
                ):
                    continue
                if job.budget_expires is not None and job in parts:
                    continue  # one slice per call: its budget is checked between calls
                room = min(slice_max, budget - used)
                start, stop, tokens, seconds = job.next_doc, job.next_doc, 0, 0.0
                docs = len(job.request.docs)
                while stop < docs and pairs + (stop - start) < self.max_pairs:
                    t = job.est[stop]
                    if tokens + t > room and not (used == 0 and stop == start):
                        break  # an empty dispatch always takes at least one document
                    if stop > start and seconds + job.cost[stop] > min(job.slice_seconds, share):
                        break
                    tokens += t
                    seconds += job.cost[stop]
                    stop += 1
                if stop == start:
                    continue
                begins = now + used_seconds
                if job.budget_expires is not None:
                    stop = self._fit(job, start, stop, begins, job.budget_expires)
                    if stop == start:
                        if job not in parts:
                            self._settle(job)
                        continue
                if job.expires is not None:
                    stop = self._fit(job, start, stop, begins, job.expires)
                    if stop == start:
                        self._expire(job)
                        continue
                stop = self._fit(job, start, stop, begins, ends_by)
                if stop == start:
                    continue  # the next call: this one must end by another job's limit
                tokens = sum(job.est[start:stop])
                seconds = sum(job.cost[start:stop])
                prev = parts.get(job)
                if prev is not None:
                    prev.stop, prev.tokens = stop, prev.tokens + tokens
                    prev.seconds += seconds
                else:
                    parts[job] = _Part(job, start, stop, tokens, seconds)
                limit = job.budget_expires if job.budget_expires is not None else job.expires
                if limit is not None:
                    ends_by = min(ends_by, limit)
                if job.budget_expires is not None:
                    share = min(share, seconds)
                job.next_doc = stop
                job.waiting_tokens -= tokens
                job.waiting_seconds -= seconds
                self._waiting_tokens -= tokens
                job.rounds += 1
                job.last_served = self._dispatch_no
                used += tokens
                used_seconds += seconds * job.slowdown
                pairs += stop - start
                progress = True
                if job.next_doc >= docs:
                    self._ring.remove(job)
                if used >= budget or pairs >= self.max_pairs:
                    break
        return list(parts.values())

    @staticmethod
    def _fit(job: _Job, start: int, stop: int, begins: float, limit: float) -> int:
        """The end of the slice ``[start, stop)`` cut to the documents predicted (at the job's
        measured slowdown) to be scored by ``limit`` if the call begins at ``begins``."""
        if limit == math.inf:
            return stop
        left = limit - begins
        seconds, end = 0.0, start
        while end < stop and seconds + job.cost[end] * job.slowdown <= left:
            seconds += job.cost[end] * job.slowdown
            end += 1
        return end

    def _settle(self, job: _Job) -> None:
        """A search's budget leaves no room for its next slice: answer with the leading documents
        scored so far (none of its slices is in flight: calls run one at a time)."""
        if job.future.done():
            return
        done = job.next_doc
        self.stats.budget_cut += 1
        self.stats.budget_cut_pairs += len(job.request.docs) - done
        job.future.set_result(job.scores[:done])
        self._finished(job)  # now, not from the callback: the planner must not see it again

    def _expire(self, job: _Job) -> None:
        """Answer a job that can no longer finish by its deadline (503), and drop its rest."""
        if job.future.done():
            return
        self.stats.deadline_missed += 1
        left = job.waiting_seconds * job.slowdown
        job.future.set_exception(
            DeadlineExceeded(
                self._retry_after(left),
                f"the reranker could not finish this request within {self.deadline_s:g} s "
                "(WINNOW_RERANK_DEADLINE_S): it ran slower than predicted, so the rest of it was "
                "not started; retry later, or send fewer or shorter documents",
            )
        )
        self._finished(job)  # now, not from the callback: the planner must not see it again

    async def _run(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        while True:
            if not self._ring:
                wakeup.clear()
                await wakeup.wait()
                if self.max_wait > 0:
                    await asyncio.sleep(self.max_wait)  # let concurrent arrivals join this call
            parts = self._plan()
            if not parts:
                continue
            try:
                await self._dispatch(parts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the collector die: fail these parts instead
                log.exception("rerank dispatch failed")
                for p in parts:
                    self._fail(p.job, exc)

    async def _dispatch(self, parts: list[_Part]) -> None:
        loop = asyncio.get_running_loop()
        requests = [self._sub_request(p) for p in parts]
        tokens = sum(p.tokens for p in parts)
        self._inflight_seconds = sum(p.seconds for p in parts)
        t0 = time.perf_counter()
        try:
            results: list[list[float] | BaseException] = list(
                await loop.run_in_executor(self._executor, self.engine.score_requests, requests)
            )
            elapsed = time.perf_counter() - t0
            self.measure(tokens, elapsed)
            predicted = sum(p.seconds for p in parts)
            if predicted > 0:  # what each job's rest will take, for its deadline
                slowdown = min(4.0, max(0.5, elapsed / predicted))
                for p in parts:
                    p.job.slowdown = slowdown
            self.cost.observe([n for p in parts for n in p.job.lens[p.start : p.stop]], elapsed)
        except Exception as exc:
            if len(parts) == 1:
                results = [exc]
            else:  # isolate: one bad request must not fail the others merged with it
                log.warning("merged rerank call failed (%s); re-running each part alone", exc)
                results = []
                for req in requests:
                    try:
                        one = await loop.run_in_executor(
                            self._executor, self.engine.score_requests, [req]
                        )
                        results.append(one[0])
                    except Exception as single:
                        results.append(single)
        finally:
            self._inflight_seconds = 0.0
            self.stats.last_dispatch_s = time.perf_counter() - t0
        self._record(parts)
        for p, res in zip(parts, results, strict=True):
            if isinstance(res, BaseException):
                self._fail(p.job, res)
            else:
                self._deliver(p, res)

    @staticmethod
    def _sub_request(p: _Part) -> RerankRequest:
        r = p.job.request
        docs = r.docs if (p.start, p.stop) == (0, len(r.docs)) else list(r.docs[p.start : p.stop])
        return RerankRequest(r.query, docs, r.instruction)

    def _deliver(self, p: _Part, scores: Sequence[float]) -> None:
        job = p.job
        if job.future.done():
            return  # cancelled meanwhile (already counted as dropped) or failed
        if len(scores) != p.stop - p.start:
            self._fail(job, RuntimeError(f"engine returned {len(scores)} scores for a slice"))
            return
        job.scores[p.start : p.stop] = scores
        job.pending -= p.stop - p.start
        if job.pending == 0:
            job.future.set_result(job.scores)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            self.stats.failed += 1
            job.future.set_exception(exc)

    def _record(self, parts: list[_Part]) -> None:
        st = self.stats
        n_pairs = sum(p.stop - p.start for p in parts)
        n_jobs = len({id(p.job) for p in parts})
        st.dispatches += 1
        st.slices += len(parts)
        st.pairs += n_pairs
        st.estimated_tokens += sum(p.tokens for p in parts)
        st.merged_dispatches += n_jobs > 1
        st.max_requests_per_dispatch = max(st.max_requests_per_dispatch, n_jobs)
        st.last_dispatch_pairs = n_pairs
        st.last_dispatch_tokens = sum(p.tokens for p in parts)
        st.dispatch_sizes = [*st.dispatch_sizes[-99:], n_pairs]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for job in list(self._jobs):
            if not job.future.done():
                job.future.cancel()
        self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)


class BatchedReranker(Reranker):
    """A ``Reranker``: any ``RerankEngine`` (transformers, vLLM) behind a :class:`MicroBatcher`."""

    def __init__(self, engine: RerankEngine, model: str, batcher: MicroBatcher) -> None:
        self.engine = engine
        self.model = model
        self.batcher = batcher
        self.backend: str = engine.backend
        self._load_lock = threading.Lock()

    def load(self) -> None:
        """Load the engine and profile it for the cost model (blocking; call off the event loop)."""
        with self._load_lock:
            self.engine.load()
            t0 = time.perf_counter()
            self.batcher.calibrate()
            log.info("reranker profiled in %.1f s", time.perf_counter() - t0)

    async def affordable(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        budget_s: float = math.inf,
        free: Sequence[bool] | None = None,
    ) -> int:
        """Leading documents that could be scored within ``budget_s`` now (see the batcher)."""
        return self.batcher.affordable(
            RerankRequest(query, list(docs), instruction), budget_s, free
        )

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        return await self.batcher.submit(RerankRequest(query, list(docs), instruction))

    async def score_within(
        self, query: str, docs: Sequence[str], instruction: str | None, budget_s: float
    ) -> list[float]:
        """The leading documents scored within ``budget_s`` (the batcher keeps it as it runs)."""
        return await self.batcher.submit(RerankRequest(query, list(docs), instruction), budget_s)

    def document_cutter(self) -> DocumentCutter | None:
        """The engine's :class:`~pipeline.rerank.cut.DocumentCutter` (windows), if it has one."""
        return self.engine.document_cutter()

    def samples(self) -> list[Sample]:
        """Batcher + engine counters, each as it is declared (the same batcher names for every
        engine, the engine's own beside them)."""
        return [*self.batcher.counters().samples(), *self.engine.samples()]

    async def aclose(self) -> None:
        await self.batcher.aclose()
