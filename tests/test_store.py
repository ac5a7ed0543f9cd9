"""MilvusStore against both paths: embedded Milvus Lite and a separate gRPC server process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MilvusServer, free_port

from pipeline.domain import Passage, passage_id
from pipeline.store import MilvusStore, SchemaMismatch, StoreUnavailable

DIM = 8


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    v[(i + 1) % DIM] = 0.1
    return v / np.linalg.norm(v)


PASSAGES = [
    Passage("a", 0, "the quick brown fox jumps over the lazy dog", "Fox", {"lang": "en"}),
    Passage("a", 1, "foxes are small omnivorous mammals", "Fox", {"lang": "en"}),
    Passage("b", 0, "le renard brun saute par-dessus le chien", "Renard", {"lang": "fr"}),
    Passage("c", 0, "databases store rows in tables", 'Quote "title"', {"lang": "en"}),
]


def exercise(store: MilvusStore) -> None:
    store.ensure_collection(DIM, "test-model")
    vectors = np.stack([vec(i) for i in range(len(PASSAGES))])
    assert store.upsert(PASSAGES, vectors) == 4
    assert store.upsert(PASSAGES, vectors) == 4  # same ids: no duplicates
    store.flush()
    assert store.count() == 4
    hits = store.dense(vec(2), 2)
    assert hits[0].doc_id == "b" and hits[0].metadata == {"lang": "fr"}
    assert 0.99 < hits[0].score <= 1.0001
    assert store.dense(vec(2), 4, filter='metadata["lang"] == "en"')[0].doc_id != "b"
    bm = store.bm25("omnivorous foxes", 2)
    assert bm[0].id == PASSAGES[1].id and bm[0].score > 0, "BM25 scores are positive everywhere"
    hy = store.hybrid(vec(3), "databases tables", 3)
    assert hy[0].doc_id == "c" and hy[0].title == 'Quote "title"'
    assert store.ids_by_doc(["a", "zzz"]) == {"a": {PASSAGES[0].id, PASSAGES[1].id}, "zzz": set()}
    store.delete([PASSAGES[0].id])
    store.delete_docs(["c"])
    assert store.count() == 2
    with pytest.raises(SchemaMismatch, match="test-model"):
        store.ensure_collection(DIM + 1, "other-model")


def test_lite_file(tmp_path: Path) -> None:
    store = MilvusStore(str(tmp_path / "lite.db"), "t")
    exercise(store)
    store.close()
    reopened = MilvusStore(str(tmp_path / "lite.db"), "t")
    assert reopened.open() == ("test-model", DIM)
    assert reopened.count() == 2


def test_server_process(milvus_server: MilvusServer) -> None:
    store = MilvusStore(milvus_server.uri, "t_server", timeout=10)
    if store.exists():
        store.drop()
    exercise(store)
    assert store.ping()


def test_server_down_then_back(tmp_path: Path) -> None:
    server = MilvusServer(tmp_path / "srv", free_port())
    server.start()
    try:
        check_down_then_back(server)
    finally:
        server.kill()


def check_down_then_back(server: MilvusServer) -> None:
    store = MilvusStore(server.uri, "t", timeout=3)
    store.ensure_collection(DIM, "m")
    store.upsert(PASSAGES[:1], vec(0)[None, :])
    server.kill()
    assert not store.ping()
    with pytest.raises(StoreUnavailable):
        store.dense(vec(0), 1)
    server.start()
    deadline = time.monotonic() + 30
    while not store.ping() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.ping(), "the store reconnects by itself once Milvus is back"
    assert store.dense(vec(0), 1)[0].doc_id == "a"


def test_passage_id_is_stable_and_content_addressed() -> None:
    p = PASSAGES[0]
    assert p.id == passage_id("a", 0, p.text, "Fox", {"lang": "en"})
    assert p.id != Passage("a", 0, p.text + "!", "Fox", {"lang": "en"}).id
    assert len(p.id) == 40
