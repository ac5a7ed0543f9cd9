"""The store contract (``pipeline/store/base.py``), the same tests over every implementation.

``memory``: the test double of the fast tier (``testkit/memory_store.py``); ``lite``: Milvus Lite, a
file in tmp; ``server``: the ``milvus-lite server`` process over gRPC (as a Milvus server). A double
that passes these is as good as Milvus for the service's tests; a Milvus change that breaks one
shows here. Deterministic unit vectors (dimension 8) keep the dense orders exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MilvusServer

from pipeline.domain import Passage
from pipeline.fusion import FUSIONS
from pipeline.store import InvalidFilter, MilvusStore, SchemaMismatch, StoreError, VectorStore
from testkit.memory_store import MemoryStore, analyze, compile_filter

DIM = 8
MODEL = "contract-model"
# Milvus kinds: ~1-5 s a test (Lite's start, the server process); the double: milliseconds
KINDS = [
    "memory",
    pytest.param("lite", marks=pytest.mark.slow),
    pytest.param("server", marks=pytest.mark.slow),
]


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


PASSAGES = [
    Passage("ocean", 0, "Tides rise and fall with the moon.", "Tides", {"lang": "en"}),
    Passage(
        "ocean", 1, "The ocean covers most of the planet; tides move it.", "Tides", {"lang": "en"}
    ),
    Passage(
        "space", 0, "Rockets carry satellites into orbit around the moon.", "Space", {"lang": "en"}
    ),
    Passage(
        "kitchen", 0, "A quiche needs eggs, cream and a crust.", 'The "quiche"', {"lang": "fr"}
    ),
    Passage("garden", 0, "Tomatoes need sun, water and patience.", "Garden", {"lang": "en"}),
]
VECTORS = np.stack(
    [unit(1, 0.1), unit(0.8, 1), unit(0.1, 0.2, 1), unit(0, 0, 0.1, 1), unit(0, 0, 0, 0.2, 1)]
)
_names = itertools.count()


@pytest.fixture(scope="module")
def lite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract") / "contract.db"


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, lite_file: Path) -> Iterator[Callable[[], VectorStore]]:
    """A factory of stores of one kind, each on a fresh collection (closed after the test)."""
    made: list[VectorStore] = []
    kind = request.param
    server: MilvusServer | None = (
        request.getfixturevalue("milvus_server") if kind == "server" else None
    )

    def factory() -> VectorStore:
        name = f"contract_{next(_names)}"
        store: VectorStore
        if kind == "memory":
            store = MemoryStore(name)
        elif kind == "lite":
            store = MilvusStore(str(lite_file), name)
        else:
            assert server is not None
            store = MilvusStore(server.uri, name, timeout=10)
            if store.exists():
                store.drop()
        made.append(store)
        return store

    yield factory
    for store in made:
        if store.exists():
            store.drop()
        store.close()


@pytest.fixture
def store(make: Callable[[], VectorStore]) -> VectorStore:
    s = make()
    s.ensure_collection(DIM, MODEL)
    s.upsert(PASSAGES, VECTORS)
    return s


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def test_upsert_is_idempotent_by_id_and_replaces_content(make) -> None:
    s = make()
    s.ensure_collection(DIM, MODEL)
    assert s.upsert(PASSAGES, VECTORS) == len(PASSAGES)
    assert s.upsert(PASSAGES, VECTORS) == len(PASSAGES)
    assert s.count() == len(PASSAGES)
    # the same ids again with new vectors: still one row each, and search sees the new content
    moved = VECTORS[[4, 0, 1, 2, 3]]
    s.upsert(PASSAGES, moved)
    assert s.count() == len(PASSAGES)
    assert s.dense(VECTORS[4], 1)[0].id == PASSAGES[0].id
    assert s.count("chunk == 0") == s.count_documents() == 4


def test_delete_by_id_and_by_document(store: VectorStore) -> None:
    store.delete([PASSAGES[0].id, "no-such-id"])
    assert store.count() == 4
    assert store.ids_by_doc(["ocean"]) == {"ocean": {PASSAGES[1].id}}
    store.delete_docs(["kitchen", "no-such-doc"])
    assert store.count() == 3
    assert PASSAGES[3].id not in ids(store.bm25("quiche", 5))
    assert store.ids_by_doc(["kitchen", "space"]) == {"kitchen": set(), "space": {PASSAGES[2].id}}


def test_get_passages_and_ids(store: VectorStore) -> None:
    got = store.passages_of("ocean", 10)
    assert [(h.id, h.chunk, h.score) for h in got] == [
        (PASSAGES[0].id, 0, 0.0),
        (PASSAGES[1].id, 1, 0.0),
    ]
    assert (got[0].title, got[0].text, got[0].metadata) == (
        "Tides",
        PASSAGES[0].text,
        {"lang": "en"},
    )
    assert len(store.passages_of("ocean", 1)) == 1
    kitchen = store.passages_of("kitchen", 10)[0]
    assert kitchen.title == 'The "quiche"' and kitchen.doc_id == "kitchen"
    assert store.ids_by_doc(["ocean", "zzz"]) == {
        "ocean": {PASSAGES[0].id, PASSAGES[1].id},
        "zzz": set(),
    }
    assert store.open() == (MODEL, DIM) and store.exists()


def test_dense_top_k_orders_by_the_metric(store: VectorStore) -> None:
    for i, p in enumerate(PASSAGES):
        hits = store.dense(VECTORS[i], 3)
        assert len(hits) == 3 and hits[0].id == p.id
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)  # COSINE of an exact match
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # cosine, not dot product: a scaled query ranks the same with the same scores
    a, b = store.dense(VECTORS[1], 5), store.dense(7 * VECTORS[1], 5)
    assert ids(a) == ids(b) and [h.score for h in b] == pytest.approx(
        [h.score for h in a], abs=1e-4
    )
    en = store.dense(VECTORS[3], 5, filter='metadata["lang"] == "en"')
    assert PASSAGES[3].id not in ids(en) and len(en) == 4
    only = store.dense(VECTORS[0], 5, filter='doc_id in ["space", "garden"] and chunk == 0')
    assert sorted(h.doc_id for h in only) == ["garden", "space"]


def test_bm25_finds_a_rare_keyword(store: VectorStore) -> None:
    hits = store.bm25("quiche recipe", 5)
    assert ids(hits) == [PASSAGES[3].id] and hits[0].score > 0
    tides = store.bm25("tides moon", 5)
    assert ids(tides)[0] == PASSAGES[0].id  # both words, shortest passage
    assert set(ids(tides)) == {PASSAGES[0].id, PASSAGES[1].id, PASSAGES[2].id}
    assert all(h.score > 0 for h in tides)
    assert [h.score for h in tides] == sorted((h.score for h in tides), reverse=True)
    assert store.bm25("zeppelin", 5) == []
    assert ids(store.bm25("moon", 5, filter='doc_id == "space"')) == [PASSAGES[2].id]


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_hybrid_is_the_union_ranked_by_the_registry(store: VectorStore, fusion: str) -> None:
    store.fusion, store.fusion_weights, store.rrf_k = fusion, (0.6, 0.4), 5
    query, text = VECTORS[4], "tides moon"
    dense, bm25 = store.dense(query, 5), store.bm25(text, 5)
    got = store.hybrid(query, text, 5)
    want = FUSIONS[fusion].fuse(dense, bm25, store.fusion_params, 5)
    assert set(ids(got)) == set(ids(dense)) | set(ids(bm25))
    assert ids(got) == ids(want)
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5)
    assert ids(store.hybrid(query, "  ", 2)) == ids(dense)[:2]  # no words: dense alone


def test_empty_collection(make) -> None:
    s = make()
    assert not s.exists() and s.open() == (None, None)
    s.ensure_collection(DIM, MODEL)
    assert s.exists() and s.open() == (MODEL, DIM)
    assert s.count() == 0 and s.count_documents() == 0
    assert s.dense(VECTORS[0], 3) == [] and s.bm25("moon", 3) == []
    assert s.hybrid(VECTORS[0], "moon", 3) == []
    assert s.ids_by_doc(["x"]) == {"x": set()} and s.passages_of("x", 5) == []
    s.delete(["x"])
    s.delete_docs(["x"])
    assert s.upsert([], np.zeros((0, DIM), dtype=np.float32)) == 0
    assert s.count() == 0


def test_bad_input_is_refused_clearly(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="2 passages but 1 vectors"):
        store.upsert(PASSAGES[:2], VECTORS[:1])
    for bad in ("doc_id ==", 'nosuchfield == "x"', 'doc_id == "a" and'):
        with pytest.raises(InvalidFilter) as info:
            store.dense(VECTORS[0], 3, filter=bad)
        assert info.value.expression == bad
        with pytest.raises(InvalidFilter):
            store.bm25("moon", 3, filter=bad)
    with pytest.raises(StoreError):
        store.dense(VECTORS[0], 0)
    with pytest.raises(SchemaMismatch, match="another-model"):
        store.ensure_collection(DIM, "another-model")
    with pytest.raises(SchemaMismatch):
        store.ensure_collection(DIM + 8, MODEL)
    assert store.count() == len(PASSAGES)  # nothing above wrote anything


# --- the double itself ----------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_store_ranks_like_milvus_lite(tmp_path: Path) -> None:
    """Same data, same queries: the double's dense and BM25 orders are Milvus Lite's."""
    lite = MilvusStore(str(tmp_path / "same.db"), "same")
    mem = MemoryStore("same")
    more = [replace(p, chunk=p.chunk + 10, text=p.text + " More about the moon.") for p in PASSAGES]
    vectors = np.concatenate([VECTORS, VECTORS[::-1] * 0.5 + VECTORS * 0.5])
    try:
        for s in (lite, mem):
            s.ensure_collection(DIM, MODEL)
            s.upsert(PASSAGES + more, vectors)
        for q in VECTORS:
            assert ids(mem.dense(q, 6)) == ids(lite.dense(q, 6))
        for text in ("moon", "tides moon", "quiche eggs", "the ocean planet", "sun water moon"):
            m, m_lite = mem.bm25(text, 10), lite.bm25(text, 10)
            assert ids(m) == ids(m_lite), text
            assert [h.score for h in m] == pytest.approx([h.score for h in m_lite], rel=0.05)
    finally:
        lite.close()


def test_memory_filter_subset() -> None:
    assert analyze("The Quick, brown FOX is here") == ["the", "quick", "brown", "fox", "is", "here"]
    rows = MemoryStore("f")
    rows.ensure_collection(DIM, MODEL)
    rows.upsert(PASSAGES, VECTORS)
    assert rows.count('metadata["lang"] == "fr"') == 1
    assert rows.count('doc_id not in ["ocean"] && chunk >= 0') == 3
    assert rows.count('(doc_id == "ocean" or doc_id == "space") and not chunk == 1') == 2
    assert rows.count('title == "The \\"quiche\\""') == 1
    assert rows.count('metadata["missing"] == "x"') == 0
    for bad in ('json_contains(metadata["tags"], "x")', "chunk = 0", 'doc_id == "x" junk'):
        with pytest.raises(InvalidFilter):
            compile_filter(bad)


def test_importing_the_store_patches_nothing() -> None:
    """Lite's quirks are installed when a Lite file is first connected, never on import."""
    import subprocess
    import sys

    code = (
        "import logging, sys, pipeline.store, pipeline.store.milvus, testkit.memory_store\n"
        "from pipeline.store import lite\n"
        "names = ('milvus_lite.server_manager', 'pymilvus.decorators')\n"
        "assert not any(logging.getLogger(n).filters for n in names)\n"
        "assert not lite.installed() and 'pymilvus' not in sys.modules and 'jieba' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_search_service_runs_on_the_double() -> None:
    """SearchService needs nothing of a store beyond the contract: the double serves every mode,
    its filters and the empty-collection message (no Milvus, no model)."""
    import asyncio

    from pipeline.config import Settings
    from pipeline.search import EMPTY_COLLECTION, SearchService

    class Vectors:  # the query embedding of a passage's text is its stored vector
        dim = DIM

        def embed(self, texts, *, query: bool) -> np.ndarray:
            by_text = {p.text: v for p, v in zip(PASSAGES, VECTORS, strict=True)}
            return np.stack([by_text.get(t, VECTORS[0]) for t in texts])

    store = MemoryStore("svc")
    store.ensure_collection(DIM, MODEL)
    service = SearchService(Settings(rerank=False), Vectors(), store)  # type: ignore[arg-type]

    def search(query: str, **kw):
        return asyncio.run(service.search(query, rerank=False, top_n=3, **kw))

    assert search("moon", mode="dense").message == EMPTY_COLLECTION
    store.upsert(PASSAGES, VECTORS)
    assert search(PASSAGES[4].text, mode="dense").results[0].doc_id == "garden"
    assert search("quiche", mode="bm25").results[0].doc_id == "kitchen"
    hybrid = search("tides moon", mode="hybrid")
    assert hybrid.mode == "hybrid" and hybrid.results[0].doc_id == "ocean"
    fr = search("moon", mode="dense", filter='metadata["lang"] == "fr"')
    assert [r.doc_id for r in fr.results] == ["kitchen"]
    with pytest.raises(InvalidFilter):
        search("moon", mode="dense", filter="lang ==")
