"""Async micro-batcher: merges concurrent rerank requests into shared forward passes.

Requests wait in a bounded queue (full → ``Overloaded``, answered as 429); a collector takes what has
arrived within ``max_wait`` (and everything that queued while the model was busy), drops requests whose
caller has gone, and hands the rest to the engine in one call on a single worker thread, so model work
never runs on the event loop. The engine cuts the merged pairs into token-budget batches itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.rerank import RerankEngine, RerankRequest

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The rerank queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the reranker queue is full")
        self.retry_after = retry_after


@dataclass
class BatcherStats:
    requests: int = 0
    dispatches: int = 0
    merged_dispatches: int = 0  # dispatches that carried pairs of more than one request
    max_requests_per_dispatch: int = 0
    pairs: int = 0
    dropped: int = 0  # requests whose caller went away before the model ran them
    rejected: int = 0
    last_dispatch_s: float = 0.0
    dispatch_sizes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Job:
    request: RerankRequest
    future: asyncio.Future[list[float]]


class MicroBatcher:
    def __init__(
        self,
        engine: RerankEngine,
        *,
        max_wait_ms: float = 2.0,
        queue_size: int = 64,
        max_pairs_per_dispatch: int = 512,
        max_requests_per_dispatch: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.max_pairs = max_pairs_per_dispatch
        self.max_requests = max_requests_per_dispatch  # None = no limit; 1 = no merging
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="winnow-rerank")
        self._busy = False

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the dispatch the model is running)."""
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_started(self) -> asyncio.Queue[_Job]:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue(self.queue_size)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rerank-batcher")
        return self._queue

    async def submit(self, request: RerankRequest) -> list[float]:
        if not request.docs:
            return []
        queue = self._ensure_started()
        job = _Job(request, asyncio.get_running_loop().create_future())
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(retry_after=max(1.0, self.stats.last_dispatch_s * 2)) from None
        self.stats.requests += 1
        return await job.future  # cancelling this marks the job, which is then skipped

    async def _take(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        jobs = [await queue.get()]
        pairs = len(jobs[0].request.docs)
        deadline = time.monotonic() + self.max_wait
        while pairs < self.max_pairs and (
            self.max_requests is None or len(jobs) < self.max_requests
        ):
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
            jobs.append(job)
            pairs += len(job.request.docs)
        return jobs

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._take(queue)
            live = [j for j in jobs if not j.future.done()]
            self.stats.dropped += len(jobs) - len(live)
            if not live:
                continue
            requests = [j.request for j in live]
            n_pairs = sum(len(r.docs) for r in requests)
            t0 = time.perf_counter()
            try:
                scores = await loop.run_in_executor(
                    self._executor, self.engine.score_requests, requests
                )
            except Exception as exc:
                log.exception("rerank dispatch failed")
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            finally:
                self.stats.last_dispatch_s = time.perf_counter() - t0
            self._record(len(live), n_pairs)
            for j, s in zip(live, scores, strict=True):
                if not j.future.done():
                    j.future.set_result(s)

    def _record(self, n_requests: int, n_pairs: int) -> None:
        st = self.stats
        st.dispatches += 1
        st.pairs += n_pairs
        st.merged_dispatches += n_requests > 1
        st.max_requests_per_dispatch = max(st.max_requests_per_dispatch, n_requests)
        st.dispatch_sizes = [*st.dispatch_sizes[-99:], n_pairs]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)


class BatchedReranker:
    """The transformers backend as a ``Reranker``: an HFEngine behind a MicroBatcher."""

    backend = "hf"

    def __init__(self, engine: RerankEngine, model: str, batcher: MicroBatcher) -> None:
        self.engine = engine
        self.model = model
        self.batcher = batcher

    def load(self) -> None:
        self.engine.load()

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        return await self.batcher.submit(RerankRequest(query, list(docs), instruction))

    def stats(self) -> dict[str, int | float]:
        st, engine = self.batcher.stats, self.engine
        return {
            "rerank_requests": st.requests,
            "rerank_dispatches": st.dispatches,
            "rerank_merged_dispatches": st.merged_dispatches,
            "rerank_dropped": st.dropped,
            "rerank_rejected": st.rejected,
            "queue_depth": self.batcher.depth,
            "last_dispatch_pairs": st.dispatch_sizes[-1] if st.dispatch_sizes else 0,
            "rerank_pairs": getattr(engine, "pairs_scored", 0),
            "rerank_tokens": getattr(engine, "tokens_scored", 0),
            "rerank_forward_passes": getattr(engine, "forward_passes", 0),
        }

    async def aclose(self) -> None:
        await self.batcher.aclose()
