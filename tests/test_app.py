"""The API in-process (fast tier): the app's own lifespan over httpx.ASGITransport, the in-memory
store and a fake reranker engine behind the real batcher; real MiniLM embeddings. What the live
uvicorn tests (test_api.py, test_http_limits.py, …) check over sockets, these check in seconds:
routes, status codes and error bodies, ranking, the write API, the rerank dialects, auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
from conftest import CORPUS, batched

from pipeline.config import Settings
from pipeline.rerank.base import RerankRequest
from testkit.fake_engine import FakeEngine
from testkit.inprocess import app_client
from testkit.memory_store import MemoryStore

Client = httpx.AsyncClient
CORPUS_DOCS = [{"id": k, "title": t, "text": x} for k, (t, x) in CORPUS.items()]


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def settings(**kw: Any) -> Settings:
    if "write_api_key" not in kw:
        kw.setdefault("writes", "on")  # a local single-user server: the tests write through the API
    # every candidate reranked (budget = the deadline): these batchers are not calibrated, so on a
    # CPU the default 10 s budget (tests/test_machine_defaults.py) would rest on the cost model's prior
    kw.setdefault("search_rerank_budget_ms", 0)
    return Settings(milvus_uri="memory://test", embed_device="cpu", rerank_device="cpu", **kw)


def run(
    embedder,
    engine,
    body: Callable[..., Coroutine[Any, Any, None]],
    *,
    corpus: bool = True,
    headers: dict[str, str] | None = None,
    batcher: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    """Run ``body(client, runtime)`` against a fresh app over a fresh in-memory store."""
    s = settings(**kw)
    store = MemoryStore("test")

    async def go() -> None:
        async with app_client(
            s,
            headers=headers,
            embedder=embedder,
            store=store,
            reranker=batched(engine, **(batcher or {})),
        ) as (client, rt):
            if corpus:
                r = await client.post("/v1/documents", json={"documents": CORPUS_DOCS})
                assert r.status_code == 200, r.text
            await body(client, rt)

    asyncio.run(go())


def test_health_ready_openapi_docs(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        assert (await c.get("/health")).json() == {"status": "ok"}
        ready = (await c.get("/ready")).json()
        assert ready["ready"] and ready["rerank"] and ready["rerank_backend"] == rt.reranker.backend
        assert "/v1/search" in (await c.get("/openapi.json")).json()["paths"]
        assert (await c.get("/docs")).status_code == 200

    run(embedder, engine, body)


def test_search_recalls_then_reranks_in_score_order(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        q = "how do plants turn sunlight into oxygen?"
        recall = (await c.post("/v1/search", json={"query": q, "rerank": False})).json()
        assert recall["results"][0]["doc_id"] == "photosynthesis"  # real MiniLM, dense recall
        assert all(r["rerank_score"] is None for r in recall["results"])
        for hybrid in (False, True):
            r = await c.post("/v1/search", json={"query": q, "hybrid": hybrid, "rerank": False})
            assert r.status_code == 200, (hybrid, r.text)
            assert r.json()["results"][0]["doc_id"] == "photosynthesis", hybrid
        res = (await c.post("/v1/search", json={"query": q, "top_n": 6})).json()
        scores = [r["score"] for r in res["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 6
        assert res["reranked"] == res["candidates"] == 6
        direct = await rt.reranker.score(
            q,
            [f"{r['title']}\n{r['text']}" if r["title"] else r["text"] for r in res["results"]],
            rt.settings.rerank_instruction,
        )
        assert direct == pytest.approx(scores, abs=1e-6)

    run(embedder, engine, body)


def test_bad_input_is_a_clear_4xx(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        cases = [
            (await c.post("/v1/search", json={"query": "   "}), 422),
            (await c.post("/v1/search", json={"query": "x", "top_k": 10**6}), 422),
            (await c.post("/v1/search", content=b"{not json", headers=JSON), 422),
            (await c.post("/v1/search", json={"query": "x", "filter": "doc_id =="}), 422),
            (await c.get("/v1/nope"), 404),
            (await c.get("/v1/search"), 405),
            (await c.post("/v1/rerank", json={"query": "x", "documents": []}), 422),
        ]
        for r, code in cases:
            assert r.status_code == code, (code, r.request.url, r.text)
            err = r.json()["error"]
            assert err["type"] and err["message"], r.text
        assert "Allow" in cases[5][0].headers
        many = {"query": "x", "documents": ["word"] * 41}
        r = await c.post("/v1/rerank", json=many)
        assert r.status_code == 413 and "WINNOW_MAX_DOCUMENTS" in r.text, r.text[:300]
        work = {"query": "x", "documents": ["word " * 3000] * 4}
        r = await c.post("/v1/rerank", json=work)
        assert r.status_code == 413 and r.json()["error"]["type"] == "work_too_large", r.text

    run(embedder, engine, body, max_documents=40, batcher={"queue_tokens": 8000})


JSON = {"content-type": "application/json"}


def test_documents_written_are_searchable_then_gone(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        doc = {"id": "glaciers", "title": "Glaciers", "text": "A glacier is a slow river of ice."}
        r = await c.post("/v1/documents", json={"documents": [doc]})
        assert r.json()["counts"] == {"created": 1}, r.text
        again = await c.post("/v1/documents", json={"documents": [doc]})
        assert again.json()["counts"] == {"unchanged": 1}, again.text
        q = {"query": "rivers of ice", "rerank": False, "top_n": 1}
        assert (await c.post("/v1/search", json=q)).json()["results"][0]["doc_id"] == "glaciers"
        got = (await c.get("/v1/documents/glaciers")).json()
        assert got["passages"][0]["text"] == doc["text"]
        assert (await c.delete("/v1/documents/glaciers")).status_code == 200
        assert (await c.delete("/v1/documents/glaciers")).status_code == 404
        top = (await c.post("/v1/search", json=q)).json()["results"][0]["doc_id"]
        assert top != "glaciers"

    run(embedder, engine, body, corpus=True)


def test_rerank_dialects_answer_in_their_own_shapes(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        docs = ["the moon pulls the sea", "coffee beans", "tides rise and fall"]
        want = await rt.reranker.score("what moves the tides?", docs, None)
        tei = await c.post("/rerank", json={"query": "what moves the tides?", "texts": docs})
        assert tei.status_code == 200, tei.text
        got = {x["index"]: x["score"] for x in tei.json()}
        assert got == pytest.approx(dict(enumerate(want)), abs=1e-6)
        for path in ("/v1/rerank", "/v2/rerank"):
            r = await c.post(
                path, json={"query": "what moves the tides?", "documents": docs, "top_n": 2}
            )
            assert r.status_code == 200, (path, r.text)
            results = r.json()["results"]
            assert len(results) == 2
            best = sorted(range(3), key=lambda i: -want[i])[:2]
            assert [x["index"] for x in results] == best
            assert results[0]["relevance_score"] == pytest.approx(want[best[0]], abs=1e-6)

    run(embedder, engine, body, corpus=False)


def test_keys_guard_the_api_and_the_writes(embedder, engine) -> None:
    async def body(c: Client, rt) -> None:
        q = {"query": "volcano", "rerank": False}
        assert (await c.post("/v1/search", json=q)).status_code == 401
        read = {"Authorization": "Bearer r-key"}
        write = {"Authorization": "Bearer w-key"}
        assert (await c.post("/v1/search", json=q, headers=read)).status_code == 200
        assert (await c.post("/v1/search", json=q, headers=write)).status_code == 200
        doc = {"documents": [{"id": "a", "text": "a"}]}
        assert (await c.post("/v1/documents", json=doc, headers=read)).status_code == 403
        assert (await c.post("/v1/documents", json=doc, headers=write)).status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key

    run(embedder, engine, body, corpus=False, api_key="r-key", write_api_key="w-key")


def test_search_that_runs_into_the_deadline_answers_with_what_it_scored(embedder) -> None:
    """The cost model believes 50 ms a pair; the engine takes 300 ms: the search (its budget is the
    1 s deadline) stops starting pairs that would end past it and answers 200 by then, with the
    leading candidates it scored first and the rest in recall order, never after it."""
    slow = FakeEngine("slow", seconds_per_pair=0.3)

    async def body(c: Client, rt) -> None:
        batcher = rt.reranker.batcher
        q = "what pulls the tides?"
        _, lengths = batcher.work(RerankRequest(q, ["x" * 300]))
        batcher.cost.set_profile([(n, 0.05) for n in (lengths[0], 2 * lengths[0])])
        recall = (await c.post("/v1/search", json={"query": q, "rerank": False})).json()
        recall_order = [x["doc_id"] for x in recall["results"]]
        t0 = time.monotonic()
        r = await c.post("/v1/search", json={"query": q})
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        body_ = r.json()
        k = body_["reranked"]
        assert 0 < k < 6 and body_["candidates"] == 6, body_
        res = body_["results"]
        assert {x["doc_id"] for x in res[:k]} == set(recall_order[:k])
        assert all(x["reranked"] for x in res[:k]) and not any(x["reranked"] for x in res[k:])
        assert [x["doc_id"] for x in res[k:]] == recall_order[k:]
        assert took < 1 + 1.0, took
        assert slow.counters.pairs_scored == k  # what could not finish was not run
        assert batcher.stats.budget_cut == 1 and batcher.stats.deadline_missed == 0

    run(embedder, slow, body, batcher={"deadline_s": 1.0, "slice_tokens": 1})
