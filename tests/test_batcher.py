"""MicroBatcher scheduling: admission by work, slices that interleave, cancellation, deadline.

Most tests drive a deterministic engine object (allowed by the issue) that records every call and can
be held at a gate, so order is asserted on dispatches, never on wall time; the equality test uses the
real tiny Qwen3 HFEngine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from pipeline.rerank.base import EngineStats, RerankEngine, RerankRequest
from pipeline.rerank.batcher import (
    BatchedReranker,
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
    WorkTooLarge,
    estimate_pair_tokens,
)


def det_score(query: str, doc: str) -> float:
    return (sum(f"{query}|{doc}".encode()) % 1009) / 1009


class ScriptedEngine(RerankEngine):
    """Records each call's (query, docs) parts; blocks while ``gate`` is clear; fails on 'boom'."""

    backend = "scripted"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, tuple[str, ...]]]] = []
        self.counters = EngineStats()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def load(self) -> None:
        pass

    def stats(self) -> EngineStats:
        self.counters.tokens_scored = 7 * len(self.calls)
        self.counters.forward_passes = len(self.calls)
        return self.counters

    def score_requests(self, requests: list[RerankRequest]) -> list[list[float]]:
        self.calls.append([(r.query, tuple(r.docs)) for r in requests])
        self.started.set()
        assert self.gate.wait(30)
        if any(r.query == "boom" for r in requests):
            raise ValueError("boom")
        return [[det_score(r.query, d) for d in r.docs] for r in requests]

    def queries_per_call(self) -> list[list[str]]:
        return [[q for q, _ in call] for call in self.calls]


def doc_of(tokens: int, tag: str) -> str:
    """A document the heuristic estimates at about ``tokens`` tokens (plus the template)."""
    return (tag + " ") + "x" * (3 * tokens)


async def until_started(engine: ScriptedEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 30)
    engine.started.clear()


def test_estimate_is_capped_and_grows_with_length() -> None:
    req = RerankRequest("q", ["a", "b" * 3000, "c" * 10**6])
    short, mid, huge = estimate_pair_tokens(req, max_length=8192)
    assert short < mid < huge == 8192
    assert mid >= 1000


@pytest.mark.parametrize(
    ("engine_budget", "setting", "expected"),
    [(1024, None, 8192), (65536, None, 65536), (None, None, 8192), (1024, 300, 300)],
)
def test_slice_is_the_engine_budget_at_least_the_default(
    engine_budget: int | None, setting: int | None, expected: int
) -> None:
    # A CPU engine's small forwards must not shrink engine calls: each call reruns every head.
    engine = ScriptedEngine()
    engine.max_batch_tokens = engine_budget  # type: ignore[attr-defined]
    assert MicroBatcher(engine, slice_tokens=setting).slice_tokens == expected


def test_sliced_scores_equal_unsliced(tiny_engine: Any) -> None:
    docs = [f"document number {i} about " + "tides and moons " * (i % 5 + 1) for i in range(12)]
    other = ["coffee beans", "volcano ash", "marathon"]
    whole = tiny_engine.score_requests([RerankRequest("tides?", docs), RerankRequest("b", other)])
    batcher = MicroBatcher(tiny_engine, slice_tokens=200, max_wait_ms=5)
    r = BatchedReranker(tiny_engine, "tiny", batcher)

    async def go() -> list[list[float]]:
        return list(await asyncio.gather(r.score("tides?", docs), r.score("b", other)))

    got = asyncio.run(go())
    for g, w in zip(got, whole, strict=True):
        assert max(abs(a - b) for a, b in zip(g, w, strict=True)) <= 1e-5
    st = r.stats()
    assert st["rerank_slices"] > 2 and st["rerank_dispatches"] > 1 and st["rerank_pairs"] == 15
    assert st["rerank_tokens"] > 0 and st["rerank_forward_passes"] > 0
    asyncio.run(r.aclose())


def test_short_request_waits_at_most_one_slice_of_a_long_one() -> None:
    engine = ScriptedEngine()
    long_docs = [doc_of(400, f"L{i}") for i in range(40)]
    batcher = MicroBatcher(engine, slice_tokens=1000, max_wait_ms=0)

    async def go() -> tuple[list[float], list[float]]:
        engine.gate.clear()
        long_task = asyncio.ensure_future(batcher.submit(RerankRequest("long", long_docs)))
        await until_started(engine)  # slice 1 of the long request is in the engine
        short_task = asyncio.ensure_future(batcher.submit(RerankRequest("short", ["a", "b"])))
        await asyncio.sleep(0)
        engine.gate.set()
        return await short_task, await long_task

    short, long = asyncio.run(go())
    calls = engine.queries_per_call()
    assert calls[0] == ["long"]
    # the very next call carries the whole short request, ahead of the long request's next slice
    assert calls[1][0] == "short" and engine.calls[1][0][1] == ("a", "b")
    assert len(calls) >= 40 * 400 // 1000  # the long request really was sliced
    assert short == [det_score("short", d) for d in ["a", "b"]]
    assert long == [det_score("long", d) for d in long_docs]  # reassembled in input order
    assert all(len(c) <= 2 for c in engine.calls)
    asyncio.run(batcher.aclose())


def test_two_long_requests_interleave_round_robin() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, slice_tokens=1000, max_wait_ms=0)
    a = [doc_of(900, f"A{i}") for i in range(4)]
    b = [doc_of(900, f"B{i}") for i in range(4)]

    async def go() -> None:
        engine.gate.clear()
        ta = asyncio.ensure_future(batcher.submit(RerankRequest("a", a)))
        await until_started(engine)
        tb = asyncio.ensure_future(batcher.submit(RerankRequest("b", b)))
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(ta, tb)

    asyncio.run(go())
    order = [c[0][0] for c in engine.calls]
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    asyncio.run(batcher.aclose())


def test_small_requests_merge_into_one_call() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, slice_tokens=4096, max_wait_ms=20)

    async def go() -> list[list[float]]:
        return list(
            await asyncio.gather(
                *(batcher.submit(RerankRequest(f"q{i}", ["d1", "d2"])) for i in range(5))
            )
        )

    got = asyncio.run(go())
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 5
    assert got == [[det_score(f"q{i}", d) for d in ["d1", "d2"]] for i in range(5)]
    assert batcher.stats.merged_dispatches == 1 and batcher.stats.max_requests_per_dispatch == 5
    asyncio.run(batcher.aclose())


def test_cancelled_request_drops_its_remaining_slices() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, slice_tokens=1000, max_wait_ms=0)
    docs = [doc_of(400, f"L{i}") for i in range(20)]

    async def go() -> None:
        engine.gate.clear()
        task = asyncio.ensure_future(batcher.submit(RerankRequest("long", docs)))
        await until_started(engine)
        assert batcher.waiting_tokens > 0
        task.cancel()  # what the API does when the client disconnects
        await asyncio.sleep(0)
        assert batcher.waiting_tokens == 0 and batcher.depth == 0
        engine.gate.set()
        ok = await batcher.submit(RerankRequest("next", ["x"]))  # the engine is free again
        assert ok == [det_score("next", "x")]

    asyncio.run(go())
    assert engine.queries_per_call() == [["long"], ["next"]]
    first_slice = len(engine.calls[0][0][1])
    st = batcher.counters().as_dict()
    assert st["rerank_dropped"] == 1 and st["rerank_dropped_pairs"] == 20 - first_slice
    asyncio.run(batcher.aclose())


def test_admission_is_bounded_in_tokens() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, queue_tokens=2000, slice_tokens=4000, max_wait_ms=0)

    async def go() -> None:
        with pytest.raises(WorkTooLarge, match="WINNOW_RERANK_QUEUE_TOKENS") as too_big:
            await batcher.submit(RerankRequest("big", [doc_of(1000, "x")] * 3))
        assert too_big.value.tokens > too_big.value.limit == 2000
        engine.gate.clear()
        running = asyncio.ensure_future(batcher.submit(RerankRequest("a", [doc_of(1500, "a")])))
        await until_started(engine)  # dispatched: no longer counts as waiting
        waiting = asyncio.ensure_future(batcher.submit(RerankRequest("b", [doc_of(1200, "b")])))
        await asyncio.sleep(0)
        assert 1200 <= batcher.waiting_tokens < 2000
        with pytest.raises(Overloaded) as full:
            await batcher.submit(RerankRequest("c", [doc_of(1200, "c")]))
        assert full.value.retry_after >= 1
        # a request small enough to fit in what is left is still admitted
        small = asyncio.ensure_future(batcher.submit(RerankRequest("d", ["tiny"])))
        engine.gate.set()
        await asyncio.gather(running, waiting, small)

    asyncio.run(go())
    st = batcher.counters().as_dict()
    assert st["rerank_too_large"] == 1 and st["rerank_rejected"] == 1 and st["rerank_requests"] == 3
    asyncio.run(batcher.aclose())


def test_request_cap_still_applies() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, queue_size=2, max_wait_ms=0)

    async def go() -> None:
        engine.gate.clear()
        first = [
            asyncio.ensure_future(batcher.submit(RerankRequest(f"q{i}", ["d"]))) for i in range(2)
        ]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(RerankRequest("q3", ["d"]))
        engine.gate.set()
        await asyncio.gather(*first)

    asyncio.run(go())
    asyncio.run(batcher.aclose())


def test_deadline_refuses_up_front() -> None:
    engine = ScriptedEngine()
    # 100 tokens/s before any measurement, 10 s deadline: at most ~1000 tokens of work.
    batcher = MicroBatcher(engine, deadline_s=10, start_tokens_per_s=100, max_wait_ms=0)

    async def go() -> None:
        with pytest.raises(WorkTooLarge, match="WINNOW_RERANK_DEADLINE_S") as alone:
            await batcher.submit(RerankRequest("big", [doc_of(600, "a"), doc_of(600, "b")]))
        assert alone.value.limit == 1000
        assert engine.calls == []  # refused before any work
        engine.gate.clear()
        running = asyncio.ensure_future(batcher.submit(RerankRequest("a", [doc_of(700, "a")])))
        await until_started(engine)
        with pytest.raises(Overloaded, match="WINNOW_RERANK_DEADLINE_S") as busy:
            await batcher.submit(RerankRequest("b", [doc_of(700, "b")]))
        assert 1 <= busy.value.retry_after <= 10
        engine.gate.set()
        await running

    asyncio.run(go())
    st = batcher.counters().as_dict()
    assert st["rerank_too_large"] == 1 and st["rerank_refused_deadline"] == 1
    assert st["rerank_tokens_per_s"] != 100  # measured after the first dispatch
    asyncio.run(batcher.aclose())


class SlowEngine(ScriptedEngine):
    """Takes ``per_doc`` seconds a document, whatever the cost model was told."""

    def __init__(self, per_doc: float) -> None:
        super().__init__()
        self.per_doc = per_doc
        self.scored = 0

    def score_requests(self, requests: list[RerankRequest]) -> list[list[float]]:
        n = sum(len(r.docs) for r in requests)
        time.sleep(self.per_doc * n)
        self.scored += n
        return super().score_requests(requests)


def test_admitted_request_that_runs_slow_is_answered_at_its_deadline() -> None:
    """Predicted 1 s, really 4 s, deadline 2 s: the rest is not started and the caller gets
    DeadlineExceeded (503) by the deadline, not a 200 after it."""
    engine = SlowEngine(per_doc=0.4)
    batcher = MicroBatcher(engine, deadline_s=2, max_wait_ms=0, slice_tokens=300)
    docs = [doc_of(100, f"d{i}") for i in range(10)]
    per_doc = batcher._estimate(RerankRequest("q", docs[:1]))[0]
    batcher.cost.set_profile([(per_doc, 0.1), (2 * per_doc, 0.2)])  # 0.1 s a document
    assert batcher.cost.seconds(batcher.work(RerankRequest("q", docs))[1]) < 2  # admitted

    async def go() -> float:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="WINNOW_RERANK_DEADLINE_S") as late:
            await batcher.submit(RerankRequest("q", docs))
        assert late.value.retry_after >= 1
        return time.monotonic() - t0

    took = asyncio.run(go())
    assert took < 2 + 1.0, took  # the deadline, plus at most a fraction of one slice
    assert engine.scored < len(docs)  # what could not finish was not run
    st = batcher.counters()
    assert st.deadline_missed == 1 and st.failed == 0
    asyncio.run(batcher.aclose())


def test_profile_seeds_the_cost_model_at_two_lengths(tiny_engine: Any) -> None:
    batcher = MicroBatcher(tiny_engine, start_tokens_per_s=1.0)
    calls = tiny_engine.counters.batches
    rate = batcher.calibrate()
    assert rate > 1.0 and tiny_engine.counters.batches - calls >= 2  # a short request, long pairs
    lengths = [n for n, _ in batcher.cost.profile]
    assert lengths[0] < lengths[1] and lengths[1] >= 256 and lengths == sorted(lengths)
    assert 0.3 < batcher.token_scale < 1.5  # engine tokens per estimated token: near 1
    # measured, not the 1 token/s start: a 500-token pair is predicted far below 500 s
    assert 0 < batcher.cost.pair_seconds(500) < 50


def quadratic_batcher(**kw: Any) -> MicroBatcher:
    """A batcher whose cost model was profiled on an engine where attention dominates long pairs:
    1 ms per token plus 0.5 µs per token² (a 2,000-token pair: 2 s + 2 s)."""
    batcher = MicroBatcher(ScriptedEngine(), max_wait_ms=0, **kw)
    batcher.cost.set_profile([(n, 1e-3 * n + 5e-7 * n * n) for n in (100, 1000)])
    return batcher


def test_deadline_knows_length() -> None:
    """About the same tokens: 4 pairs of ~2,100 is refused where 30 of ~220 is admitted."""
    batcher = quadratic_batcher(deadline_s=10)

    async def go() -> None:
        with pytest.raises(WorkTooLarge, match="at the measured cost of pairs of its lengths"):
            await batcher.submit(RerankRequest("long", [doc_of(2000, f"L{i}") for i in range(4)]))
        short = [doc_of(100, f"S{i}") for i in range(30)]
        assert len(await batcher.submit(RerankRequest("short", short))) == 30

    asyncio.run(go())
    # a flat rate from the short profile point (~1.05 ms a token) would have promised ~9 s
    long_tokens = batcher._estimate(RerankRequest("long", [doc_of(2000, "L")]))[0]
    assert 4 * long_tokens * 1.05e-3 < 10 < batcher.cost.seconds([long_tokens] * 4)
    asyncio.run(batcher.aclose())


def test_dispatches_teach_the_cost_model_per_length() -> None:
    batcher = quadratic_batcher()

    async def go() -> None:
        await batcher.submit(RerankRequest("q", [doc_of(300, f"d{i}") for i in range(5)]))

    before = batcher.cost.snapshot()
    asyncio.run(go())
    after = batcher.cost.snapshot()  # the scripted engine is far faster than the profile said
    assert "bucket_512_tokens_per_s" in after and "bucket_512_tokens_per_s" not in before
    assert after["bucket_512_tokens_per_s"] > 2 * batcher.cost.tokens_per_s(8192)
    asyncio.run(batcher.aclose())


def test_affordable_counts_leading_documents_that_fit() -> None:
    batcher = quadratic_batcher(deadline_s=30)
    docs = [doc_of(1000, f"d{i}") for i in range(10)]  # ~1.6 s each by the model
    req = RerankRequest("q", docs)
    one = batcher.cost.pair_seconds(batcher._estimate(req)[0])
    assert batcher.affordable(req, 3.5 * one) == 3
    assert batcher.affordable(req, 100.0) == 10  # the budget is at most the deadline: 30 s fits 10
    assert batcher.affordable(req, 0.5 * one) == 0  # not even one, on an idle queue: no error
    free = [True, True] + [False] * 8  # cache hits cost nothing
    assert batcher.affordable(req, 3.5 * one, free) == 5

    async def busy() -> None:
        engine = batcher.engine
        engine.gate.clear()
        running = asyncio.ensure_future(batcher.submit(RerankRequest("big", docs[:8])))
        await until_started(engine)
        # the queue ahead leaves no room for one document within 2 of them: overload, not budget
        with pytest.raises(Overloaded) as exc:
            batcher.affordable(req, 2 * one)
        assert exc.value.retry_after >= 1
        assert batcher.affordable(req, 20.0) < batcher.affordable(req, 30.0) <= 10
        engine.gate.set()
        await running

    asyncio.run(busy())
    asyncio.run(batcher.aclose())


def test_failed_merged_call_isolates_the_bad_request() -> None:
    engine = ScriptedEngine()
    batcher = MicroBatcher(engine, max_wait_ms=20)

    async def go() -> list[Any]:
        return list(
            await asyncio.gather(
                batcher.submit(RerankRequest("good", ["d"])),
                batcher.submit(RerankRequest("boom", ["d"])),
                return_exceptions=True,
            )
        )

    good, bad = asyncio.run(go())
    assert good == [det_score("good", "d")] and isinstance(bad, ValueError)
    assert engine.queries_per_call() == [["good", "boom"], ["good"], ["boom"]]
    assert batcher.counters().as_dict()["rerank_failed"] == 1
    asyncio.run(batcher.aclose())


# --- a search's budget, kept while it runs (issue 30) ----------------------------------------------
def told_per_doc(batcher: MicroBatcher, seconds: float) -> None:
    """Make the cost model believe every ``doc_of(100, …)`` pair takes ``seconds``."""
    per_doc = batcher._estimate(RerankRequest("q", [doc_of(100, "d")]))[0]
    batcher.cost.set_profile([(per_doc, seconds), (2 * per_doc, 2 * seconds)])


def test_budget_answers_with_the_documents_scored_within_it() -> None:
    """Predicted 0.1 s a document, really 0.3 s: a 2 s budget planned for all 10 is kept. The search
    gets the leading documents scored by then (a prefix, exact scores), at the budget, not after."""
    engine = SlowEngine(per_doc=0.3)
    batcher = MicroBatcher(engine, deadline_s=30, max_wait_ms=0)
    told_per_doc(batcher, 0.1)
    docs = [doc_of(100, f"d{i}") for i in range(10)]

    async def go() -> tuple[list[float], float]:
        t0 = time.monotonic()
        got = await batcher.submit(RerankRequest("q", docs), budget_s=2.0)
        return got, time.monotonic() - t0

    got, took = asyncio.run(go())
    assert 0 < len(got) < len(docs), got
    assert got == [det_score("q", d) for d in docs[: len(got)]]
    assert took <= 2.0 + 0.35, took  # at most one document's misprediction past it
    assert engine.scored == len(got)  # what could not finish was not started
    # slices of at most a quarter of the budget (predicted), one per call
    assert all(len(call[0][1]) <= 5 for call in engine.calls)
    st = batcher.counters()
    assert st.budget_cut == 1 and st.budget_cut_pairs == len(docs) - len(got)
    assert st.deadline_missed == 0 and st.failed == 0
    asyncio.run(batcher.aclose())


def test_budget_that_holds_scores_everything() -> None:
    engine = SlowEngine(per_doc=0.02)
    batcher = MicroBatcher(engine, deadline_s=30, max_wait_ms=0)
    told_per_doc(batcher, 0.02)
    docs = [doc_of(100, f"d{i}") for i in range(10)]
    got = asyncio.run(batcher.submit(RerankRequest("q", docs), budget_s=2.0))
    assert got == [det_score("q", d) for d in docs]
    assert batcher.counters().budget_cut == 0
    asyncio.run(batcher.aclose())


def test_budgeted_search_merged_with_a_long_request_gets_its_share() -> None:
    """A long /v1/rerank request (no budget) and a budgeted search in the same calls: the search is
    planned first, the other slices are no longer than its own, and so it finishes within its
    budget; the long request still gets every score."""
    engine = SlowEngine(per_doc=0.05)
    batcher = MicroBatcher(engine, deadline_s=60, max_wait_ms=0, slice_tokens=100_000)
    told_per_doc(batcher, 0.05)
    long_docs = [doc_of(100, f"L{i}") for i in range(40)]  # 2 s of work in one slice, alone
    search_docs = [doc_of(100, f"S{i}") for i in range(6)]  # 0.3 s

    async def go() -> tuple[list[float], list[float], float]:
        engine.gate.clear()
        hold = asyncio.ensure_future(batcher.submit(RerankRequest("hold", ["h"])))
        await until_started(engine)
        long_task = asyncio.ensure_future(batcher.submit(RerankRequest("long", long_docs)))
        await asyncio.sleep(0)
        t0 = time.monotonic()
        search = asyncio.ensure_future(
            batcher.submit(RerankRequest("search", search_docs), budget_s=1.0)
        )
        await asyncio.sleep(0)
        engine.gate.set()
        await hold
        got = await search
        took = time.monotonic() - t0
        return got, await long_task, took

    got, long, took = asyncio.run(go())
    assert got == [det_score("search", d) for d in search_docs]
    assert took <= 1.0 + 0.5, took
    assert long == [det_score("long", d) for d in long_docs]
    with_search = [dict(c) for c in engine.calls if any(q == "search" for q, _ in c)]
    assert with_search
    for call in with_search:  # the long request's slice is no longer than the search's
        assert len(call.get("long", ())) <= len(call["search"]), engine.calls
    assert batcher.counters().budget_cut == 0
    asyncio.run(batcher.aclose())
