"""The HTTP API over real HTTP: real MiniLM, Milvus Lite / milvus-lite server, tiny Qwen3 reranker."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, MilvusServer, batched, corpus_records, free_port, write_jsonl

from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.domain import join_title

pytestmark = pytest.mark.slow


def app_settings(db: Path, **kw) -> Settings:
    # every candidate reranked (budget = the deadline): these batchers are not calibrated, so on a
    # CPU the default 10 s budget (tests/test_machine_defaults.py) would rest on the cost model's prior
    kw.setdefault("search_rerank_budget_ms", 0)
    return Settings(milvus_uri=str(db), embed_device="cpu", rerank_device="cpu", **kw)


def copy_db(sample_db: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "w.db"
    shutil.copytree(sample_db, dst) if sample_db.is_dir() else shutil.copy(sample_db, dst)
    return dst


@pytest.fixture(scope="module")
def live(tmp_path_factory, sample_db, embedder, tiny_engine) -> Iterator[LiveServer]:
    db = copy_db(sample_db, tmp_path_factory.mktemp("api"))
    s = app_settings(db, max_documents=40, rerank_max_wait_ms=50)
    app = create_app(s, embedder=embedder, reranker=batched(tiny_engine, max_wait_ms=50))
    with LiveServer(app) as server:
        yield server


def test_health_ready_docs(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/health", timeout=60).json() == {"status": "ok"}
    ready = httpx.get(f"{live.url}/ready", timeout=60).json()
    assert ready["ready"] and ready["rerank"] and ready["rerank_backend"] == "hf"
    assert "/v1/search" in httpx.get(f"{live.url}/openapi.json", timeout=60).json()["paths"]
    assert httpx.get(f"{live.url}/docs", timeout=60).status_code == 200


def test_search_recall_only_finds_the_answer(live: LiveServer) -> None:
    r = httpx.post(
        f"{live.url}/v1/search",
        json={"query": "why does the sea level rise and fall?", "rerank": False, "top_n": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["doc_id"] == "tides"
    assert body["reranked"] == 0 and body["mode"] == "hybrid"
    assert not any(r["reranked"] for r in body["results"])
    assert body["results"][0]["rerank_score"] is None
    assert set(body["timings_ms"]) == {"embed", "recall", "rerank", "total"}
    dense = httpx.post(
        f"{live.url}/v1/search",
        json={"query": "a drink made from roasted beans", "rerank": False, "hybrid": False},
        timeout=60,
    ).json()
    assert dense["mode"] == "dense" and dense["results"][0]["doc_id"] == "coffee"


def test_search_reranked_matches_engine(live: LiveServer, tiny_engine) -> None:
    q = "what makes plants produce oxygen?"
    body = httpx.post(
        f"{live.url}/v1/search", json={"query": q, "top_k": 6, "top_n": 6}, timeout=60
    ).json()
    res = body["results"]
    assert body["reranked"] and len(res) == 6 and len({r["doc_id"] for r in res}) == 6
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    direct = tiny_engine.score(
        q, [join_title(r["title"], r["text"]) for r in res], Settings().rerank_instruction
    )
    assert direct == pytest.approx(scores, abs=1e-5)
    assert body["timings_ms"]["rerank"] > 0


def test_rerank_endpoint_order_and_documents(live: LiveServer, tiny_engine) -> None:
    docs = [r["text"] for r in corpus_records()]
    r = httpx.post(
        f"{live.url}/v1/rerank",
        json={"query": "coffee", "documents": docs, "top_n": 3, "return_documents": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    expect = tiny_engine.score("coffee", docs)
    order = sorted(range(len(docs)), key=lambda i: expect[i], reverse=True)[:3]
    assert [x["index"] for x in out["results"]] == order
    assert [x["relevance_score"] for x in out["results"]] == pytest.approx(
        [expect[i] for i in order], abs=1e-5
    )
    assert out["results"][0]["document"]["text"] == docs[order[0]]
    # Jina-style object documents are accepted too
    obj = httpx.post(
        f"{live.url}/v1/rerank",
        json={"query": "coffee", "documents": [{"text": docs[0]}]},
        timeout=60,
    ).json()
    assert obj["results"][0]["index"] == 0 and "document" not in obj["results"][0]


def test_cohere_sdk(live: LiveServer, tiny_engine) -> None:
    import cohere

    co = cohere.ClientV2(base_url=live.url, api_key="unused")
    docs = ["Beijing is the capital of China.", "Gravity pulls.", "Paris is in France."]
    resp = co.rerank(model="qwen3-reranker", query="capital of China?", documents=docs, top_n=2)
    expect = tiny_engine.score("capital of China?", docs)
    assert len(resp.results) == 2
    assert resp.results[0].index == max(range(3), key=lambda i: expect[i])
    assert resp.results[0].relevance_score == pytest.approx(max(expect), abs=1e-5)


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/v1/search", {"query": ""}, 422, "query"),
        ("/v1/search", {"query": "x", "top_k": 0}, 422, "top_k"),
        ("/v1/search", {"query": "x", "top_k": 5000}, 422, "WINNOW_MAX_TOP_K"),
        ("/v1/search", {"query": "x", "bogus": 1}, 422, "bogus"),
        ("/v1/search", {"query": "x", "filter": "doc_id === 3"}, 422, "not a valid expression"),
        ("/v1/search", {"query": "x" * 5000}, 422, "WINNOW_MAX_QUERY_CHARS"),
        ("/v1/rerank", {"query": "x", "documents": []}, 422, "documents"),
        ("/v1/rerank", {"query": "x", "documents": ["d"] * 41}, 413, "WINNOW_MAX_DOCUMENTS"),
        (
            "/v1/rerank",
            {"query": "x", "documents": ["y" * 200_000], "truncate": False},
            422,
            "truncate",
        ),
    ],
)
def test_bad_requests(live: LiveServer, path: str, payload: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{live.url}{path}", json=payload, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert "Traceback" not in r.text


def test_long_document_is_truncated_not_refused(live: LiveServer) -> None:
    body = {"query": "x", "documents": ["y " * 150_000]}
    r = httpx.post(f"{live.url}/v1/rerank", json=body, timeout=120)  # ~4.5 s alone on 2 cores
    assert r.status_code == 200 and 0 <= r.json()["results"][0]["relevance_score"] <= 1


def test_concurrent_requests_share_batches(live: LiveServer) -> None:
    app = live.server.config.app
    stats = app.state.winnow.runtime.reranker.batcher.stats
    before = stats.merged_dispatches
    docs = [r["text"] for r in corpus_records()]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            rs = await asyncio.gather(
                *(
                    client.post("/v1/rerank", json={"query": f"query {i}", "documents": docs})
                    for i in range(8)
                )
            )
        return [r.status_code for r in rs]

    assert asyncio.run(fire()) == [200] * 8
    assert stats.merged_dispatches > before
    assert stats.max_requests_per_dispatch > 1
    metrics = httpx.get(f"{live.url}/metrics", timeout=60).text
    assert "winnow_rerank_merged_dispatches_total" in metrics
    assert 'winnow_http_requests_total{route="/v1/rerank",status="200"}' in metrics
    assert "winnow_rerank_tokens_total" in metrics


@pytest.mark.parametrize(
    ("path", "first", "second"),
    [
        ("/v1/rerank", "query", "documents"),
        ("/rerank", "query", "texts"),
        ("/score", "text_1", "text_2"),
    ],
)
def test_queue_full_is_429(
    tmp_path: Path, sample_db, embedder, tiny_engine, path: str, first: str, second: str
) -> None:
    """Every dialect goes through the same admission: Cohere/Jina, TEI and vLLM's /score."""
    db = copy_db(sample_db, tmp_path)
    app = create_app(
        app_settings(db), embedder=embedder, reranker=batched(tiny_engine, queue_size=1)
    )
    docs = ["a fairly long document about many things " * 40] * 30
    with LiveServer(app) as server:

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                return await asyncio.gather(
                    *(client.post(path, json={first: f"q{i}", second: docs}) for i in range(12))
                )

        rs = asyncio.run(fire())
    codes = [r.status_code for r in rs]
    assert 200 in codes and 429 in codes, codes
    limited = next(r for r in rs if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "overloaded" and limited.json()["detail"]


def test_api_key(tmp_path: Path, sample_db, embedder) -> None:
    db = copy_db(sample_db, tmp_path)
    app = create_app(app_settings(db, api_key="s3cret", rerank=False), embedder=embedder)
    with LiveServer(app) as server:
        url = f"{server.url}/v1/search"
        assert httpx.post(url, json={"query": "tides"}, timeout=60).status_code == 401
        bad = httpx.post(
            url, json={"query": "tides"}, headers={"Authorization": "Bearer nope"}, timeout=60
        )
        assert bad.status_code == 401 and bad.headers["WWW-Authenticate"] == "Bearer"
        ok = httpx.post(
            url, json={"query": "tides"}, headers={"Authorization": "Bearer s3cret"}, timeout=60
        )
        assert ok.status_code == 200 and ok.json()["reranked"] == 0
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        rr = httpx.post(
            f"{server.url}/v1/rerank",
            json={"query": "q", "documents": ["d"]},
            headers={"Authorization": "Bearer s3cret"},
            timeout=60,
        )
        assert rr.status_code == 503 and "WINNOW_RERANK" in rr.json()["error"]["message"]
        forced = httpx.post(
            url,
            json={"query": "tides", "rerank": True},
            headers={"Authorization": "Bearer s3cret"},
            timeout=60,
        )
        assert forced.status_code == 503  # the same status as /v1/rerank: the server cannot rerank
        assert forced.json()["error"]["type"] == rr.json()["error"]["type"] == "rerank_disabled"


def test_milvus_server_killed_and_restarted(tmp_path: Path, embedder) -> None:
    from ingest.job import IngestJob

    server = MilvusServer(tmp_path / "srv", free_port())
    server.start()
    try:
        s = app_settings(tmp_path / "unused.db", rerank=False, milvus_timeout=3)
        s = s.model_copy(update={"milvus_uri": server.uri})
        job = IngestJob(s, embedder=embedder)
        job.run([write_jsonl(tmp_path / "c.jsonl", corpus_records())], progress=False)
        job.store.close()
        with LiveServer(create_app(s, embedder=embedder)) as live:
            q = {"query": "sea level tides"}
            assert httpx.post(f"{live.url}/v1/search", json=q, timeout=60).status_code == 200
            server.kill()
            t0 = time.monotonic()
            down = httpx.post(f"{live.url}/v1/search", json=q, timeout=60)
            assert down.status_code == 503 and time.monotonic() - t0 < 30
            assert down.json()["error"]["type"] == "milvus_unavailable"
            assert httpx.get(f"{live.url}/ready", timeout=60).status_code == 503
            server.start()
            deadline = time.monotonic() + 60
            while httpx.get(f"{live.url}/ready", timeout=60).status_code != 200:
                assert time.monotonic() < deadline, "service did not recover"
                time.sleep(0.5)
            back = httpx.post(f"{live.url}/v1/search", json=q, timeout=60)
            assert back.status_code == 200 and back.json()["results"][0]["doc_id"] == "tides"
    finally:
        server.kill()
