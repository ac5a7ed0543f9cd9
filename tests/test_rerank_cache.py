"""Score cache, long documents in windows, min_score: unit checks and the same over real HTTP.

The engine is the tiny random Qwen3 (testkit/tiny_qwen.py) behind the real batcher; the remote cases use
real Winnow servers on loopback. The windows test builds a document whose part that this model judges
relevant lies past token 8192, behind a part it does not: found with windows, missed without.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, batched, free_port
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.rerank.backends.remote.reranker import RemoteReranker
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.cache import (
    DIGEST_BYTES,
    ENTRY_BYTES,
    CachedReranker,
    ScoreCache,
    identity,
    pair_keys,
    unwrap,
)
from pipeline.rerank.factory import with_cache
from pipeline.rerank.prompt import encode_fixed
from testkit.fake_engine import FakeEngine, fake_score

QUERY = "what makes plants produce oxygen?"
DOCS = [
    "Plants use chlorophyll to turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "A volcano is a rupture in the crust of a planet where lava escapes.",
    "Tides are caused by the gravitational pull of the moon.",
    "",
    "北京是中国的首都。",
    "Oxygen is released when water molecules are split during the light reactions.",
]
CUSTOM = "Given a biology question, retrieve passages that explain the mechanism"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def cached(engine: Any, mb: int = 1, **kw: Any) -> CachedReranker:
    settings = Settings(rerank_cache_mb=mb, rerank_backend="hf", **kw)
    reranker = with_cache(batched(engine), settings.reranker)
    assert isinstance(reranker, CachedReranker)
    return reranker


async def score_twice(r: Any, *calls: tuple[str, list[str], str | None]) -> list[list[float]]:
    try:
        return [await r.score(q, d, i) for q, d, i in calls]
    finally:
        await r.aclose()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


# --- the cache itself ---------------------------------------------------------------------------
def test_lru_is_bounded_in_bytes() -> None:
    cache = ScoreCache(10 * ENTRY_BYTES)
    keys = [bytes([i]) * DIGEST_BYTES for i in range(15)]
    for i, k in enumerate(keys[:10]):
        cache.put(k, i / 10)
    assert cache.get(keys[0]) == 0.0  # now the most recently used
    for i, k in enumerate(keys[10:]):
        cache.put(k, 1 - i / 10)
    assert len(cache) == 10 and cache.bytes == 10 * ENTRY_BYTES and cache.evictions == 5
    assert cache.get(keys[0]) == 0.0  # kept: it was used
    assert all(cache.get(k) is None for k in keys[1:6])  # the five least recently used went
    assert cache.stats()["rerank_cache_hits"] == 2 and cache.stats()["rerank_cache_misses"] == 5
    off = ScoreCache(0)
    off.put(keys[0], 0.5)
    assert len(off) == 0 and off.get(keys[0]) is None


def test_entry_bytes_is_what_python_spends() -> None:
    """ENTRY_BYTES (what the bound charges) against tracemalloc's count for 20,000 entries."""
    n = 20_000
    docs = [f"document {i}" for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    data: OrderedDict[bytes, float] = OrderedDict()
    for i, k in enumerate(pair_keys("id", "q", docs, None)):  # digests made here, as in the cache
        data[k] = i / n
    spent = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    assert 0.8 * ENTRY_BYTES <= spent <= 1.25 * ENTRY_BYTES, (spent, ENTRY_BYTES)


def test_keys_separate_every_part() -> None:
    base = pair_keys("model-a", "q", ["doc"], None)[0]
    assert len(base) == DIGEST_BYTES
    assert pair_keys("model-a", "q", ["doc"], None)[0] == base
    # the default instruction is the same key whether named or not
    from pipeline.rerank.prompt import DEFAULT_INSTRUCTION

    assert pair_keys("model-a", "q", ["doc"], DEFAULT_INSTRUCTION)[0] == base
    others = [
        pair_keys("model-b", "q", ["doc"], None)[0],
        pair_keys("model-a", "q2", ["doc"], None)[0],
        pair_keys("model-a", "q", ["doc2"], None)[0],
        pair_keys("model-a", "q", ["doc"], "custom")[0],
        pair_keys("model-a", "qd", ["oc"], None)[0],  # no two splits of the same text collide
    ]
    assert len({base, *others}) == 6

    def of(**kw: object) -> str:
        return identity(Settings(**kw).reranker)

    assert of() != of(rerank_model="other/model")
    assert of() != of(rerank_max_length=4096)
    assert of() != of(rerank_dtype="float32")
    remote = {"rerank_backend": "remote", "rerank_url": "http://a/v1/rerank"}
    assert of(**remote) != of(**remote, rerank_remote_model="other")


# --- exactness and work through the engine ------------------------------------------------------
def test_cached_scores_equal_fresh_ones_bit_for_bit(tiny_engine: Any) -> None:
    r = cached(tiny_engine)
    first, second, custom = run(
        score_twice(r, (QUERY, DOCS, None), (QUERY, DOCS, None), (QUERY, DOCS, CUSTOM))
    )
    fresh = run(score_twice(batched(tiny_engine), (QUERY, DOCS, None)))[0]
    assert second == first == fresh  # ==, not approx: the same floats
    assert custom != first  # another instruction is another key
    st = r.stats()
    assert st["rerank_cache_hits"] == len(DOCS) and st["rerank_cache_misses"] == 2 * len(DOCS)
    assert st["rerank_pairs"] == 2 * len(DOCS)  # the second call never reached the batcher
    assert st["rerank_cache_entries"] == 2 * len(DOCS)


def test_only_misses_reach_the_batcher(tiny_engine: Any) -> None:
    r = cached(tiny_engine)
    new = ["Photosynthesis happens in the chloroplasts.", "Coffee is brewed from beans."]
    a, b = run(score_twice(r, (QUERY, DOCS[:3], None), (QUERY, [*DOCS[:3], *new], None)))
    assert b[:3] == a
    st = r.stats()
    assert st["rerank_pairs"] == 5 and st["rerank_requests"] == 2
    assert st["rerank_cache_hits"] == 3
    assert isinstance(unwrap(r).batcher.stats.pairs, int)


def test_within_a_budget_hits_are_free_and_the_answer_is_a_prefix() -> None:
    """Misses run within the budget (slower than predicted: only the first slice fits); the answer is
    every document up to the first miss that was not scored, hits included, each its exact score."""
    engine = FakeEngine("model", seconds_per_pair=0.2)
    r = cached(engine)
    batcher = unwrap(r).batcher
    docs = [f"document {i} about tides and the moon" for i in range(10)]
    run(r.score(QUERY, [docs[0], docs[1], docs[3]]))  # cached: 0, 1, 3
    _, lengths = batcher.work(RerankRequest(QUERY, docs[:1]))
    batcher.cost.set_profile([(lengths[0], 0.05), (2 * lengths[0], 0.1)])  # told 4x too fast
    got = run(r.score_within(QUERY, docs, None, 0.84))  # slices of 0.21 s told: 4 misses each
    assert got == [fake_score(QUERY, d) for d in docs[:7]]  # 0, 1 hit; 2 fresh; 3 hit; 4-6 fresh
    assert batcher.stats.budget_cut == 1 and batcher.stats.budget_cut_pairs == 3
    assert len(r.cache) == 7


def test_the_cache_is_on_by_default_and_off_at_zero() -> None:
    from pipeline.rerank.factory import build_reranker

    assert Settings().rerank_cache_mb == 64
    assert isinstance(build_reranker(Settings(rerank_backend="hf").reranker), CachedReranker)
    assert not isinstance(
        build_reranker(Settings(rerank_backend="hf", rerank_cache_mb=0).reranker), CachedReranker
    )


def app_with(tmp_path: Path, embedder: Any, reranker: Any, **kw: Any) -> LiveServer:
    from pipeline.api import create_app

    settings = Settings(
        milvus_uri=str(tmp_path / "w.db"), embed_device="cpu", rerank_device="cpu", **kw
    )
    return LiveServer(create_app(settings, embedder=embedder, reranker=reranker))


@pytest.mark.slow
def test_cache_over_http_with_metrics(tmp_path: Path, embedder: Any, tiny_engine: Any) -> None:
    with app_with(tmp_path, embedder, cached(tiny_engine)) as app:
        body = {"query": QUERY, "documents": DOCS}
        one = httpx.post(f"{app.url}/v1/rerank", json=body, timeout=60).json()
        two = httpx.post(f"{app.url}/v1/rerank", json=body, timeout=60).json()
        assert one["results"] == two["results"]  # same order, same floats
        assert metric(app.url, "winnow_rerank_cache_hits_total") == len(DOCS)
        assert metric(app.url, "winnow_rerank_cache_misses_total") == len(DOCS)
        assert metric(app.url, "winnow_rerank_cache_entries") == len(DOCS)
        assert metric(app.url, "winnow_rerank_cache_bytes") == len(DOCS) * ENTRY_BYTES


# --- a remote that restarts with another model --------------------------------------------------
@pytest.mark.slow
def test_remote_restarted_with_another_model_never_serves_a_stale_score(
    tmp_path: Path, embedder: Any, tiny_engine: Any
) -> None:
    from pipeline.rerank.backends.hf.engine import HFEngine
    from testkit.tiny_qwen import build_tiny_reranker

    other = HFEngine(
        str(build_tiny_reranker(tmp_path / "other", seed=7)), device="cpu", dtype="float32"
    )
    other.load()
    port = free_port()
    settings = Settings(
        rerank_backend="remote", rerank_url=f"http://127.0.0.1:{port}/v1/rerank", rerank_cache_mb=1
    )
    r = with_cache(RemoteReranker.from_settings(settings.reranker), settings.reranker)

    def serve(engine: Any, name: str) -> LiveServer:
        from pipeline.api import create_app

        s = Settings(milvus_uri=str(tmp_path / f"{name}.db"), embed_device="cpu", rerank_model=name)
        return LiveServer(create_app(s, embedder=embedder, reranker=batched(engine)), port=port)

    async def scenario() -> None:
        try:
            with serve(tiny_engine, "tiny-a"):
                a1 = await r.score(QUERY, DOCS)
                calls = unwrap(r).stats()["remote_calls"]
                assert await r.score(QUERY, DOCS) == a1  # hits: no call at all
                assert unwrap(r).stats()["remote_calls"] == calls
            assert await r.health() is False  # what /ready sees while it is down
            with serve(other, "tiny-b"):
                b = await r.score(QUERY, DOCS)
            assert b == pytest.approx(other.score(QUERY, DOCS, None), abs=1e-6)
            assert b != pytest.approx(a1, abs=1e-3)
            assert r.stats()["rerank_cache_invalidations"] == 1
        finally:
            await r.aclose()

    run(scenario())


# --- long documents: windows --------------------------------------------------------------------
SECTIONS = [
    "Plants use chlorophyll to turn sunlight, water and carbon dioxide into glucose and oxygen. ",
    "Gravity is a force that attracts two bodies towards each other. ",
    "The capital of China is Beijing. ",
    "Coffee is brewed from roasted coffee beans. ",
    "A volcano is a rupture in the crust of a planet where lava escapes. ",
    "The marathon is a long-distance race of 42.195 kilometres. ",
]
WINDOW_QUERY = "what is gravity?"


@pytest.fixture(scope="module")
def needle_doc(tiny_engine: Any) -> tuple[str, str, str]:
    """(document, its first part, its relevant part): the part of SECTIONS this model scores
    lowest, past token 8192, then the one it scores highest, ~3,000 tokens of it."""
    probe = tiny_engine.score(WINDOW_QUERY, [s * 60 for s in SECTIONS], None)
    low = SECTIONS[min(range(len(SECTIONS)), key=probe.__getitem__)]
    high = SECTIONS[max(range(len(SECTIONS)), key=probe.__getitem__)]
    assert max(probe) - min(probe) > 0.5, probe
    tok = tiny_engine._tokenizer

    def repeated(text: str, tokens: int) -> str:
        per_copy = len(tok(text * 100)["input_ids"]) / 100  # copies merge at their seams
        return text * (int(tokens / per_copy) + 1)

    first = repeated(low, 8400)
    relevant = repeated(high, 3000)
    assert len(tok(first)["input_ids"]) > 8192
    return first + relevant, first, relevant


def test_windows_keep_query_and_suffix_and_overlap(tiny_engine: Any, needle_doc: Any) -> None:
    doc, _, _ = needle_doc
    cutter = tiny_engine.document_cutter()
    tok = tiny_engine._tokenizer
    short = "a short document"
    windows = cutter.windows(RerankRequest(WINDOW_QUERY, [doc, short]), 4, 256)
    assert windows[1] == [short]  # fits: scored as given
    assert len(windows[0]) == 2
    prefix, suffix = encode_fixed(tok)
    for text in windows[0]:
        assert text and doc.find(text[:200]) >= 0  # a slice of the document
        cut = cutter.cut(RerankRequest(WINDOW_QUERY, [text]))
        assert cut.docs == [text]  # fits the pair budget whole: query and suffix kept
        assert cut.tokens is not None and cut.tokens[0] <= cutter.max_length
    first_end = windows[0][0][-300:]
    assert first_end in windows[0][1]  # neighbours overlap
    assert cutter.windows(RerankRequest(WINDOW_QUERY, [doc]), 1, 256) == [[doc]]
    assert len(prefix) > 0 and len(suffix) > 0


@pytest.mark.slow
def test_relevant_part_past_token_8192_found_with_windows_missed_without(
    tmp_path: Path, embedder: Any, tiny_engine: Any, needle_doc: Any
) -> None:
    doc, first, relevant = needle_doc
    short = "Gravity pulls."
    with app_with(tmp_path, embedder, batched(tiny_engine), rerank_cache_mb=0) as app:

        def ask(**kw: Any) -> dict[str, Any]:
            body = {"query": WINDOW_QUERY, "documents": [doc, short], **kw}
            resp = httpx.post(f"{app.url}/v1/rerank", json=body, timeout=300)
            assert resp.status_code == 200, resp.text
            return {r["index"]: r for r in resp.json()["results"]}

        without = ask()
        windowed = ask(max_chunks_per_doc=4)
        too_many = httpx.post(
            f"{app.url}/v1/rerank",
            json={"query": WINDOW_QUERY, "documents": [doc], "max_chunks_per_doc": 17},
            timeout=30,
        )
        assert too_many.status_code == 422 and "WINNOW_RERANK_MAX_CHUNKS_PER_DOC" in too_many.text
        schema = httpx.get(f"{app.url}/openapi.json", timeout=10).json()
    windows = tiny_engine.document_cutter().windows(RerankRequest(WINDOW_QUERY, [doc]), 4, 256)[0]
    per_window = tiny_engine.score(WINDOW_QUERY, windows, None)
    assert windowed[0]["best_window"] == len(windows) - 1  # the window that holds the relevant part
    assert windowed[0]["relevance_score"] == pytest.approx(max(per_window), abs=1e-4)
    assert "best_window" not in without[0]
    assert without[0]["relevance_score"] == pytest.approx(
        tiny_engine.score(WINDOW_QUERY, [doc], None)[0], abs=1e-4
    )
    relevant_alone = tiny_engine.score(WINDOW_QUERY, [relevant], None)[0]
    first_alone = tiny_engine.score(WINDOW_QUERY, [first[:20_000]], None)[0]
    assert abs(windowed[0]["relevance_score"] - relevant_alone) < 0.2  # found: scores like it
    assert abs(without[0]["relevance_score"] - first_alone) < 0.2  # missed: scores like the rest
    assert windowed[0]["relevance_score"] - without[0]["relevance_score"] > 0.5
    assert windowed[1]["best_window"] == 0  # a short document is its own single window
    prop = schema["components"]["schemas"]["RerankBody"]["properties"]["max_chunks_per_doc"]
    (integer,) = [b for b in prop["anyOf"] if b.get("type") == "integer"]
    assert (integer["minimum"], integer["maximum"]) == (1, 16)  # the limit is in the schema


@pytest.mark.slow
def test_windows_count_as_work(
    tmp_path: Path, embedder: Any, tiny_engine: Any, needle_doc: Any
) -> None:
    """A request that fits the work limit as 2 cut documents is refused (413) as their windows."""
    doc, _, _ = needle_doc
    engine = batched(tiny_engine, queue_tokens=2 * 8192 + 100)
    with app_with(tmp_path, embedder, engine, rerank_cache_mb=0) as app:
        body = {"query": WINDOW_QUERY, "documents": [doc, doc]}
        assert httpx.post(f"{app.url}/v1/rerank", json=body, timeout=300).status_code == 200
        body["max_chunks_per_doc"] = 2
        refused = httpx.post(f"{app.url}/v1/rerank", json=body, timeout=60)
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["type"] == "work_too_large"


# --- min_score ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_min_score_on_rerank_and_search(
    tmp_path: Path, embedder: Any, tiny_engine: Any, sample_db: Path
) -> None:
    import shutil

    db = tmp_path / "s.db"
    shutil.copy(sample_db, db) if sample_db.is_file() else shutil.copytree(sample_db, db)
    want = tiny_engine.score(QUERY, DOCS, None)
    threshold = sorted(want)[len(want) // 2]  # keeps the upper half
    from pipeline.api import create_app

    settings = Settings(milvus_uri=str(db), embed_device="cpu", rerank_device="cpu")
    app = create_app(settings, embedder=embedder, reranker=batched(tiny_engine))
    with LiveServer(app) as server:
        body = {"query": QUERY, "documents": DOCS, "min_score": threshold}
        got = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60).json()
        kept = [r["index"] for r in got["results"]]
        assert sorted(kept) == sorted(i for i, s in enumerate(want) if s >= threshold)
        assert got["below_min_score"] == len(DOCS) - len(kept)
        plain = httpx.post(
            f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60
        ).json()
        assert "below_min_score" not in plain and len(plain["results"]) == len(DOCS)
        for bad in (-0.1, 1.5, "0.5"):
            resp = httpx.post(
                f"{server.url}/v1/rerank",
                json={"query": QUERY, "documents": DOCS, "min_score": bad},
                timeout=30,
            )
            assert resp.status_code == 422, bad

        everything = httpx.post(
            f"{server.url}/v1/search", json={"query": "tides", "top_n": 6}, timeout=60
        ).json()
        scores = [h["score"] for h in everything["results"]]
        cut = sorted(scores)[len(scores) // 2]
        some = httpx.post(
            f"{server.url}/v1/search",
            json={"query": "tides", "top_n": 2, "min_score": cut},
            timeout=60,
        ).json()
        assert all(h["score"] >= cut for h in some["results"]) and len(some["results"]) <= 2
        assert some["below_min_score"] == sum(s < cut for s in scores)
        assert everything["below_min_score"] is None
        windowed = httpx.post(
            f"{server.url}/v1/search",
            json={"query": "tides", "top_n": 3, "max_chunks_per_doc": 2},
            timeout=60,
        ).json()
        assert [h["best_window"] for h in windowed["results"]] == [0, 0, 0]  # short passages
        assert [h["score"] for h in windowed["results"]] == scores[:3]


def test_the_cutter_never_shares_the_engines_tokenizer(tiny_engine: Any) -> None:
    """A fast tokenizer's truncation is set on the object by each call, so one shared by the engine's
    worker and a request thread (windows, cuts, the usage counter) can cut one call's document by the
    other's settings: seen as a wrong score for a long document when the usage counter was built
    beside a request's first scoring. The cutter (and what is built from it) keeps its own copy."""
    cutter = tiny_engine.document_cutter()
    engine_tok = tiny_engine._tokenizer
    assert cutter.tokenizer is not engine_tok
    assert cutter.tokenizer.backend_tokenizer is not engine_tok.backend_tokenizer
    counter = cutter.token_counter()
    request = RerankRequest(WINDOW_QUERY, ["a short document", "word " * 20_000])
    assert counter.pair_tokens(request) == cutter.cut(request).tokens  # the same count, apart
