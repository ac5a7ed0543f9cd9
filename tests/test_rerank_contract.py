"""The reranker contract (pipeline/rerank/base.py), one set of tests for every implementation.

Engines (``RerankEngine``): the test double ``testkit.fake_engine.FakeEngine`` and the real
``HFEngine`` over the tiny Qwen3 (``slow``: building it takes ~15-30 s on 2 cores) pass the same
tests, so a fast test that uses the fake relies only on what the real engine does too. Rerankers (``Reranker``): the batched engine, the score cache in
front of it, and the remote reranker against a loopback /rerank server over the fake engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from fastapi import FastAPI, Request

from pipeline.rerank.backends.remote.reranker import RemoteReranker
from pipeline.rerank.base import EngineStats, RerankEngine, Reranker, RerankRequest, Sample
from pipeline.rerank.batcher import BatchedReranker, MicroBatcher
from pipeline.rerank.cache import CachedReranker, ScoreCache
from testkit.fake_engine import FakeEngine, fake_score
from testkit.servers import LiveServer

QUERY = "what makes plants produce oxygen"
DOCS = [
    "Plants use sunlight to produce oxygen and glucose.",
    "A volcano is a rupture in the crust of a planet.",
    "",
    "Oxygen is released when water is split in the light reactions of plants.",
    "北京是中国的首都。",
]


@pytest.fixture(params=["fake", pytest.param("hf", marks=pytest.mark.slow)])
def engine(request: pytest.FixtureRequest) -> RerankEngine:
    if request.param == "fake":
        return FakeEngine()
    return request.getfixturevalue("tiny_engine")


def close(a: Sequence[float], b: Sequence[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- engines ----------------------------------------------------------------------------------------
def test_engine_scores_are_probabilities_in_input_order(engine: RerankEngine) -> None:
    engine.load()
    scores = engine.score(QUERY, DOCS)
    assert len(scores) == len(DOCS)
    assert all(isinstance(s, float) and math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    one_by_one = [engine.score(QUERY, [d])[0] for d in DOCS]
    assert close(scores, one_by_one)  # a pair's score does not depend on the other documents


def test_engine_scores_do_not_depend_on_order_or_merging(engine: RerankEngine) -> None:
    order = [3, 0, 4, 2, 1]
    base = engine.score(QUERY, DOCS)
    shuffled = engine.score(QUERY, [DOCS[i] for i in order])
    assert close(shuffled, [base[i] for i in order])
    other = RerankRequest("capital of china", DOCS[::-1], "Given a question, find the answer")
    merged = engine.score_requests([RerankRequest(QUERY, DOCS), other])
    assert close(merged[0], base)
    assert close(merged[1], engine.score_requests([other])[0])


def test_engine_empty_requests_and_documents(engine: RerankEngine) -> None:
    assert engine.score_requests([]) == []
    assert engine.score_requests([RerankRequest(QUERY, [])]) == [[]]
    out = engine.score_requests([RerankRequest(QUERY, []), RerankRequest(QUERY, [""])])
    assert out[0] == [] and len(out[1]) == 1 and 0.0 <= out[1][0] <= 1.0


def test_engine_counts_its_work(engine: RerankEngine) -> None:
    before = dataclasses.replace(engine.stats())
    engine.score_requests([RerankRequest(QUERY, DOCS[:2]), RerankRequest("q", ["d"])])
    after = engine.stats()
    assert isinstance(after, EngineStats)
    assert after.requests_scored - before.requests_scored == 2
    assert after.pairs_scored - before.pairs_scored == 3
    assert after.batches - before.batches == 1
    assert after.forward_passes > before.forward_passes
    assert after.tokens_scored > before.tokens_scored
    assert engine.tokens_scored() == after.tokens_scored
    assert {m.name for m, _ in engine.samples()} >= {m.name for _, m in EngineStats.metrics()}


def test_engine_capabilities(engine: RerankEngine) -> None:
    """Optional capabilities are methods with defaults: callable on every engine, no probing."""
    engine.load()
    request = RerankRequest(QUERY, DOCS[:1])
    estimate = engine.estimate_tokens(request)
    assert estimate is None or estimate > 0
    budget = engine.max_batch_tokens
    assert budget is None or budget > 0
    cutter = engine.document_cutter()
    if cutter is not None:  # the real engine has its tokenizer: windows and usage
        assert cutter.estimate_tokens(request) > 0
    assert isinstance(engine.backend, str) and engine.backend


def test_fake_engine_is_the_documented_function() -> None:
    fake = FakeEngine()
    assert fake.score(QUERY, DOCS) == [fake_score(QUERY, d) for d in DOCS]
    best = max(range(len(DOCS)), key=lambda i: fake.score(QUERY, DOCS)[i])
    assert best in (0, 3)  # the documents that share the query's words
    # the instruction is part of the pair (as in the card's prompt)
    assert fake.score("q", ["d"], "another instruction") != fake.score("q", ["d"])


class Minimal(RerankEngine):
    """The least an engine must write: load, score_requests, stats."""

    def __init__(self) -> None:
        self.counters = EngineStats()

    def load(self) -> None:
        pass

    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        return [[0.5] * len(r.docs) for r in requests]

    def stats(self) -> EngineStats:
        return self.counters


def test_engine_defaults() -> None:
    e = Minimal()
    assert e.estimate_tokens(RerankRequest("q", ["d"])) is None
    assert e.document_cutter() is None
    assert e.max_batch_tokens is None
    assert e.tokens_scored() == 0
    assert e.score("q", ["a", "b"]) == [0.5, 0.5]
    with pytest.raises(TypeError):
        RerankEngine()  # type: ignore[abstract]


# --- rerankers ---------------------------------------------------------------------------------------
def batched(engine: RerankEngine) -> Reranker:
    return BatchedReranker(engine, "model", MicroBatcher(engine, max_wait_ms=1))


def cached(engine: RerankEngine) -> Reranker:
    return CachedReranker(batched(engine), ScoreCache(1 << 20), "model")


def rerank_app(engine: RerankEngine) -> Any:
    """A /rerank server in Winnow's format (raw query, documents, instruction) over ``engine``."""
    app = FastAPI()

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        body = await request.json()
        scores = engine.score(body["query"], body["documents"], body.get("instruction"))
        results = [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]
        return {"model": "model", "results": results[::-1]}  # any order: matched by index

    return app


@pytest.fixture(params=["batched", "cached", "remote"])
def make_reranker(request: pytest.FixtureRequest) -> Iterator[Callable[[], Reranker]]:
    """A factory of the reranker under test (an async test builds and closes it in its own loop)."""
    if request.param == "remote":
        with LiveServer(rerank_app(FakeEngine())) as server:
            url = f"{server.url}/v1/rerank"
            yield lambda: RemoteReranker(url, model="model", fmt="winnow", max_documents=2)
        return
    wrap = batched if request.param == "batched" else cached
    yield lambda: wrap(FakeEngine())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reranker_scores_like_its_engine(make_reranker: Callable[[], Reranker]) -> None:
    async def go() -> None:
        reranker = make_reranker()
        try:
            first = await reranker.score(QUERY, DOCS)
            again = await reranker.score(QUERY, DOCS)  # the cache's hits: the very same floats
            reverse = await reranker.score(QUERY, DOCS[::-1])
            instructed = await reranker.score(QUERY, DOCS, "Given a question, find the answer")
            assert await reranker.score(QUERY, []) == []
            within = await reranker.score_within(QUERY, DOCS, None, 60.0)  # a budget that holds
        finally:
            await reranker.aclose()
        assert close(first, [fake_score(QUERY, d) for d in DOCS], 1e-9)
        assert within == first
        assert again == first and reverse == first[::-1]
        assert close(
            instructed,
            [fake_score(QUERY, d, "Given a question, find the answer") for d in DOCS],
            1e-9,
        )

    run(go())


def test_reranker_concurrent_requests_each_get_their_own(
    make_reranker: Callable[[], Reranker],
) -> None:
    queries = [QUERY, "capital of china", "volcano crust", "nothing in common"]

    async def go() -> list[list[float]]:
        reranker = make_reranker()
        try:
            return await asyncio.gather(*(reranker.score(q, DOCS) for q in queries))
        finally:
            await reranker.aclose()

    for q, scores in zip(queries, run(go()), strict=True):
        assert close(scores, [fake_score(q, d) for d in DOCS], 1e-9)


def test_reranker_capabilities_and_stats(make_reranker: Callable[[], Reranker]) -> None:
    async def go() -> None:
        reranker = make_reranker()
        try:
            assert reranker.backend in ("fake", "remote") and reranker.model == "model"
            assert reranker.document_cutter() is None  # no tokenizer here
            assert await reranker.health() is True
            assert reranker.epoch == 0
            assert await reranker.affordable(QUERY, DOCS) == len(DOCS)
            assert await reranker.affordable(QUERY, DOCS, free=[True] * len(DOCS)) == len(DOCS)
            await reranker.score(QUERY, DOCS)
            stats = reranker.stats()
            samples: list[Sample] = reranker.samples()
        finally:
            await reranker.aclose()
        assert stats["rerank_requests"] == 1 and stats["rerank_pairs"] == len(DOCS)
        assert set(stats) >= {m.key for m, _ in samples}
        names = [m.name for m, _ in samples]
        assert len(names) == len(set(names))

    run(go())


class Bare(Reranker):
    backend = "bare"
    model = "bare"

    def load(self) -> None:
        pass

    async def score(self, query: str, docs: Sequence[str], instruction: str | None = None):
        return [0.0] * len(docs)

    def samples(self) -> list[Sample]:
        return []


def test_reranker_defaults() -> None:
    r = Bare()
    assert run(r.affordable("q", ["a", "b", "c"], budget_s=0.0)) == 3
    assert run(r.score_within("q", ["a", "b"], None, 0.0)) == [0.0, 0.0]  # no scheduler: all
    assert r.document_cutter() is None
    assert run(r.health()) is True
    assert r.epoch == 0 and r.stats() == {}
    assert run(r.aclose()) is None
    with pytest.raises(TypeError):
        Reranker()  # type: ignore[abstract]
