"""The write API over real HTTP, on Milvus Lite and on a ``milvus-lite server`` process.

Real MiniLM, real uvicorn on loopback, a tiny random Qwen3 reranker (for the score-cache case).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import LiveServer, MilvusServer, batched, write_jsonl

from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.domain import Document, join_title

pytestmark = pytest.mark.slow

READ, WRITE = "read-key", "write-key"
R = {"Authorization": f"Bearer {READ}"}
W = {"Authorization": f"Bearer {WRITE}"}
BACKENDS = ["lite", "server"]


def settings_for(backend: str, tmp: Path, server: MilvusServer | None, **kw) -> Settings:
    if backend == "lite":
        uri, collection = str(tmp / "w.db"), "winnow"
    else:
        assert server is not None
        uri, collection = server.uri, f"w_{uuid.uuid4().hex[:10]}"
    base = dict(
        milvus_uri=uri,
        collection=collection,
        embed_device="cpu",
        rerank_device="cpu",
        api_key=READ,
        write_api_key=WRITE,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(params=BACKENDS, scope="module")
def live(request, tmp_path_factory, embedder, tiny_engine) -> Iterator[LiveServer]:
    """A server on an empty store, with a read key and a write key, reranking with tiny Qwen3."""
    server = request.getfixturevalue("milvus_server") if request.param == "server" else None
    s = settings_for(
        request.param, tmp_path_factory.mktemp("writes"), server, max_write_documents=20
    )
    app = create_app(s, embedder=embedder, reranker=batched(tiny_engine, max_wait_ms=5))
    with LiveServer(app) as srv:
        srv.backend = request.param  # type: ignore[attr-defined]
        yield srv


def post_docs(url: str, docs: list[dict], headers: dict = W) -> httpx.Response:
    return httpx.post(f"{url}/v1/documents", json={"documents": docs}, headers=headers, timeout=120)


def search(url: str, query: str, **kw) -> dict:
    body = {"query": query, "rerank": False, "top_n": 20, **kw}
    r = httpx.post(f"{url}/v1/search", json=body, headers=R, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ready(url: str) -> dict:
    return httpx.get(f"{url}/ready", timeout=10).json()


# --- an empty store -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_server_on_an_empty_store_creates_the_collection(
    backend: str, tmp_path: Path, request, embedder
) -> None:
    server = request.getfixturevalue("milvus_server") if backend == "server" else None
    s = settings_for(backend, tmp_path, server, rerank=False)
    with LiveServer(create_app(s, embedder=embedder)) as srv:
        body = ready(srv.url)
        assert body["ready"] and body["collection"] == "ok" and body["documents"] == 0
        assert "POST /v1/documents" in body["hint"] and body["writes"] is True
        res = search(srv.url, "anything at all")
        assert res["results"] == [] and "collection is empty" in res["message"]
        assert post_docs(srv.url, [{"id": "x", "text": "Glaciers are rivers of ice."}]).json()[
            "counts"
        ] == {"created": 1}
        assert ready(srv.url)["documents"] == 1 and ready(srv.url)["hint"] is None
        res = search(srv.url, "rivers of ice")
        assert [r["doc_id"] for r in res["results"]] == ["x"] and res["message"] is None


# --- create / update / unchanged / delete -------------------------------------------------------
def test_create_update_unchanged_delete(live: LiveServer) -> None:
    url = live.url
    docs = [
        {"id": "cud/a", "title": "Aurora", "text": "Auroras are lights in polar skies."},
        {"id": "cud/b", "text": "Bees make honey from nectar.", "metadata": {"lang": "en"}},
    ]
    r = post_docs(url, docs)
    assert r.status_code == 200, r.text
    assert [(x["id"], x["status"], x["embedded"]) for x in r.json()["results"]] == [
        ("cud/a", "created", 1),
        ("cud/b", "created", 1),
    ]
    got = httpx.get(f"{url}/v1/documents/cud/b", headers=R, timeout=60).json()
    assert got["id"] == "cud/b" and got["passages"][0]["text"] == docs[1]["text"]
    assert got["passages"][0]["metadata"] == {"lang": "en"}
    # the same again: unchanged, nothing embedded
    again = post_docs(url, docs).json()
    assert again["counts"] == {"unchanged": 2}
    assert all(x["embedded"] == 0 and x["passages"] == 1 for x in again["results"])
    # a change: the new text is searchable, the old text is gone, the stale passage deleted
    changed = post_docs(url, [{"id": "cud/a", "text": "Zebras have black and white stripes."}])
    assert changed.json()["results"][0] | {} == {
        "id": "cud/a",
        "status": "updated",
        "passages": 1,
        "embedded": 1,
        "deleted": 1,
        "reason": None,
    }
    hits = search(url, "zebra stripes", filter='doc_id like "cud/%"')["results"]
    assert hits[0]["doc_id"] == "cud/a" and "Zebras" in hits[0]["text"]
    assert all("Aurora" not in h["text"] for h in search(url, "polar lights aurora")["results"])
    assert (
        len(httpx.get(f"{url}/v1/documents/cud/a", headers=R, timeout=60).json()["passages"]) == 1
    )
    # delete one, then a batch with one unknown id
    d = httpx.delete(f"{url}/v1/documents/cud/a", headers=W, timeout=60)
    assert d.status_code == 200 and d.json()["results"][0]["status"] == "deleted"
    assert httpx.get(f"{url}/v1/documents/cud/a", headers=R, timeout=60).status_code == 404
    assert httpx.delete(f"{url}/v1/documents/cud/a", headers=W, timeout=60).status_code == 404
    assert all(h["doc_id"] != "cud/a" for h in search(url, "zebra stripes")["results"])
    batch = httpx.post(
        f"{url}/v1/documents/delete", json={"ids": ["cud/b", "nope"]}, headers=W, timeout=60
    )
    assert [(x["id"], x["status"]) for x in batch.json()["results"]] == [
        ("cud/b", "deleted"),
        ("nope", "not_found"),
    ]
    assert all(h["doc_id"] != "cud/b" for h in search(url, "honey bees nectar")["results"])
    metrics = httpx.get(f"{url}/metrics", headers=R, timeout=60).text  # /metrics takes the API key
    assert "winnow_write_queue_depth 0.0" in metrics and "winnow_write_queue_chars 0.0" in metrics
    assert 'winnow_http_requests_total{route="/v1/documents",status="200"}' in metrics


def test_a_long_document_is_chunked_like_ingest_and_shrinks_cleanly(live: LiveServer) -> None:
    long = " ".join(f"Sentence {i} tells of rivers, mountains and the sea." for i in range(120))
    first = post_docs(live.url, [{"id": "long", "text": long}]).json()["results"][0]
    assert first["status"] == "created" and first["passages"] > 3
    short = post_docs(live.url, [{"id": "long", "text": "Now it is short."}]).json()["results"][0]
    assert short["status"] == "updated" and short["passages"] == 1
    assert short["deleted"] == first["passages"]
    got = httpx.get(f"{live.url}/v1/documents/long", headers=R, timeout=60).json()["passages"]
    assert [p["text"] for p in got] == ["Now it is short."]


def test_bad_input_gets_a_4xx_that_says_what_to_fix(live: LiveServer) -> None:
    url = live.url
    r = post_docs(url, [{"id": "ok1", "text": "fine text"}, {"id": "e", "text": "   "}])
    assert r.status_code == 200
    assert [(x["status"], x.get("reason")) for x in r.json()["results"]] == [
        ("created", None),
        ("rejected", "text is empty"),
    ]
    r = post_docs(url, [{"id": "x" * 600, "text": "t"}])
    assert (
        r.json()["results"][0]["status"] == "rejected"
        and "512 bytes" in r.json()["results"][0]["reason"]
    )
    r = post_docs(url, [{"id": "d", "text": "a"}, {"id": "d", "text": "b"}])
    assert [(x["status"], x.get("reason")) for x in r.json()["results"]] == [
        ("created", None),
        ("rejected", "duplicate id: an earlier document in this batch has it"),
    ]
    for bad, why in (
        ({"id": "big", "text": "t", "metadata": {"n": 2**70}}, "64 bits"),
        ({"id": "sur", "text": "a\ud800b"}, "lone surrogate"),
        ({"id": "t", "text": "t", "title": "x" * 3000}, "2048 bytes"),
    ):
        body = json.dumps({"documents": [bad, {"id": "fine", "text": "fine"}]})
        r = httpx.post(
            f"{url}/v1/documents",
            content=body,
            headers={**W, "content-type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[0]["status"] == "rejected" and why in res[0]["reason"], res
        assert res[1]["status"] in ("created", "unchanged"), res
    r = post_docs(url, [{"id": f"n{i}", "text": "t"} for i in range(21)])
    assert r.status_code == 413 and "WINNOW_MAX_WRITE_DOCUMENTS" in r.json()["error"]["message"]
    r = post_docs(url, [{"id": 5, "text": "t"}])
    assert r.status_code == 422 and "documents.0.id" in r.json()["error"]["message"]
    r = post_docs(url, [])
    assert r.status_code == 422 and "documents" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/documents", content=b"{not json", headers=W, timeout=60)
    assert 400 <= r.status_code < 500


def test_ids_with_quotes_slashes_and_control_characters(live: LiveServer) -> None:
    """Ids are quoted into Milvus filters: none may break a write, a read or a delete."""
    ids = ['say "hi"', "back\\slash", "tab\there", "bell\x07x", "nul\x00x", "docs/a b/ü.md"]
    r = post_docs(live.url, [{"id": i, "text": f"Odd id number {n}."} for n, i in enumerate(ids)])
    assert r.status_code == 200 and r.json()["counts"] == {"created": len(ids)}, r.text
    for n, i in enumerate(ids):
        got = httpx.get(f"{live.url}/v1/documents/{quote(i, safe='/')}", headers=R, timeout=60)
        assert got.status_code == 200 and got.json()["id"] == i, (i, got.text)
        assert got.json()["passages"][0]["text"] == f"Odd id number {n}."
    r = httpx.post(f"{live.url}/v1/documents/delete", json={"ids": ids}, headers=W, timeout=60)
    assert r.json()["counts"] == {"deleted": len(ids)}, r.text


# --- auth ---------------------------------------------------------------------------------------
ROUTES = [
    ("read", "POST", "/v1/search", {"query": "q", "rerank": False}),
    ("read", "POST", "/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("read", "GET", "/v1/documents/auth-doc", None),
    ("write", "POST", "/v1/documents", {"documents": [{"id": "auth-doc", "text": "auth text"}]}),
    ("write", "POST", "/v1/documents/delete", {"ids": ["nothing-here"]}),
    ("write", "DELETE", "/v1/documents/nothing-here", None),
]


def call(url: str, method: str, path: str, body: dict | None, headers: dict) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


def test_auth_matrix(live: LiveServer) -> None:
    post_docs(live.url, [{"id": "auth-doc", "text": "auth text"}])
    for kind, method, path, body in ROUTES:
        assert call(live.url, method, path, body, {}).status_code == 401, path
        wrong = call(live.url, method, path, body, {"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        read = call(live.url, method, path, body, R)
        write = call(live.url, method, path, body, W)
        if kind == "read":
            assert read.status_code == 200 and write.status_code == 200, (path, read.text)
        else:
            assert read.status_code == 403, path
            assert read.json()["error"]["type"] == "read_only_key"
            assert "WINNOW_WRITE_API_KEY" in read.json()["error"]["message"]
            assert write.status_code in (200, 404), (path, write.text)


@pytest.mark.parametrize(
    ("writes", "keys", "expect"),
    [
        ("auto", {}, 403),  # no write key: off, and the message says how to turn them on
        ("auto", {"api_key": READ}, 403),
        ("auto", {"api_key": READ, "none": True}, 401),  # who you are comes before what you may do
        ("on", {}, 200),  # a local single-user server, explicitly
        ("on", {"api_key": READ}, 200),  # then the read key writes too
        ("off", {"write_api_key": WRITE}, 403),
    ],
)
def test_writes_are_off_unless_a_write_key_or_writes_on(
    tmp_path: Path, embedder, writes: str, keys: dict, expect: int
) -> None:
    s = Settings(
        milvus_uri=str(tmp_path / "w.db"), embed_device="cpu", rerank=False, writes=writes, **keys
    )
    keys = dict(keys)
    anonymous = keys.pop("none", False)
    key = keys.get("api_key") or keys.get("write_api_key")
    headers = {} if anonymous else {"Authorization": f"Bearer {key}"}
    with LiveServer(create_app(s, embedder=embedder)) as srv:
        for _, method, path, body in ROUTES[3:]:
            r = call(srv.url, method, path, body, headers)
            if expect == 200:
                assert r.status_code in (200, 404), (path, r.text)
            elif expect == 401:
                assert r.status_code == 401, (path, r.text)
                continue
            else:
                assert r.status_code == 403, (path, r.text)
                msg = r.json()["error"]["message"]
                assert "WINNOW_WRITES=" in msg, msg
                if writes == "auto":
                    assert "WINNOW_WRITE_API_KEY" in msg
        # reads still work whatever the write setting (GET of a document is a read)
        read = call(srv.url, "POST", "/v1/search", ROUTES[0][3], headers)
        assert read.status_code == (401 if anonymous else 200)
        got = call(srv.url, "GET", "/v1/documents/none", None, headers)
        assert got.status_code == (401 if anonymous else 404)


# --- read-your-writes under concurrent searches --------------------------------------------------
def test_searches_during_writes_see_every_write_and_never_fail(live: LiveServer) -> None:
    """A writer changes one document round after round while searchers run; after each write
    returns, a search finds the new text and never the old; no answer is a 5xx."""
    url = live.url
    words = ["walrus", "penguin", "albatross", "narwhal", "pelican", "flamingo"]

    async def run() -> tuple[list[int], list[str]]:
        statuses: list[int] = []
        failures: list[str] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(headers=W, timeout=120) as client:

            async def searcher(i: int) -> None:
                while not stop.is_set():
                    r = await client.post(
                        f"{url}/v1/search",
                        json={"query": f"sea birds {i}", "rerank": i % 2 == 0, "top_k": 8},
                    )
                    statuses.append(r.status_code)

            async def writer() -> None:
                for n, word in enumerate(words):
                    filler = [
                        {"id": f"fill-{n}-{k}", "text": f"Filler {k} about {word} habitats."}
                        for k in range(8)
                    ]
                    doc = {"id": "rw", "text": f"The {word} is the animal of round {n}."}
                    r = await client.post(f"{url}/v1/documents", json={"documents": [doc, *filler]})
                    statuses.append(r.status_code)
                    found = await client.post(
                        f"{url}/v1/search",
                        json={"query": word, "rerank": False, "hybrid": True, "top_n": 50},
                    )
                    texts = [h["text"] for h in found.json()["results"] if h["doc_id"] == "rw"]
                    if texts != [doc["text"]]:
                        failures.append(f"round {n}: {texts}")
                    got = await client.get(f"{url}/v1/documents/rw")
                    if [p["text"] for p in got.json()["passages"]] != [doc["text"]]:
                        failures.append(f"round {n} GET: {got.text}")
                stop.set()

            await asyncio.gather(writer(), *(searcher(i) for i in range(4)))
        return statuses, failures

    statuses, failures = asyncio.run(run())
    assert not failures, failures
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert len(statuses) > len(words) * 2


def test_write_queue_full_is_429_with_retry_after(tmp_path: Path, embedder) -> None:
    s = Settings(
        milvus_uri=str(tmp_path / "w.db"),
        embed_device="cpu",
        rerank=False,
        writes="on",
        write_queue_size=1,
        write_embed_slice=1,
    )
    text = " ".join(f"word{i} river stone" for i in range(1500))  # many passages: a slow write

    async def run(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            first = asyncio.create_task(
                client.post(
                    f"{url}/v1/documents", json={"documents": [{"id": "big", "text": text}]}
                )
            )
            await asyncio.sleep(1.0)
            second = await client.post(
                f"{url}/v1/documents", json={"documents": [{"id": "s", "text": "small"}]}
            )
            return [await first, second]

    with LiveServer(create_app(s, embedder=embedder)) as srv:
        first, second = asyncio.run(run(srv.url))
    assert first.status_code == 200, first.text
    assert second.status_code == 429, second.text
    assert int(second.headers["retry-after"]) >= 1
    assert "WINNOW_WRITE_QUEUE_SIZE" in second.json()["error"]["message"]


# --- the score cache ------------------------------------------------------------------------------
def test_the_score_cache_never_scores_changed_or_deleted_text(
    live: LiveServer, tiny_engine
) -> None:
    """The cache keys on the document text: a changed text is a new key, a deleted passage is
    not recalled. The score reported is always the engine's score of the text stored now."""
    url, q = live.url, "where do penguins live?"
    flt = 'doc_id == "cache-doc"'
    post_docs(url, [{"id": "cache-doc", "title": "Birds", "text": "Penguins live in Antarctica."}])

    def reranked() -> list[dict]:
        body = {"query": q, "filter": flt, "top_k": 5, "top_n": 5}
        r = httpx.post(f"{url}/v1/search", json=body, headers=R, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["reranked"] == bool(r.json()["results"]), r.text
        return r.json()["results"]

    instruction = Settings().rerank_instruction
    before = reranked()
    assert reranked() == before  # the second time from the score cache
    [hit] = before
    assert hit["score"] == pytest.approx(
        tiny_engine.score(q, [join_title(hit["title"], hit["text"])], instruction)[0], abs=1e-5
    )
    post_docs(url, [{"id": "cache-doc", "title": "Birds", "text": "Penguins swim in cold seas."}])
    [after] = reranked()
    assert after["text"] == "Penguins swim in cold seas."
    fresh = tiny_engine.score(q, [join_title("Birds", after["text"])], instruction)[0]
    assert after["score"] == pytest.approx(fresh, abs=1e-5)
    assert after["score"] != pytest.approx(hit["score"], abs=1e-7)
    httpx.delete(f"{url}/v1/documents/cache-doc", headers=W, timeout=60)
    assert reranked() == []


# --- ingest --server ------------------------------------------------------------------------------
def ingest_cli(corpus: Path, url: str, *extra: str, env_key: str = WRITE) -> subprocess.Popen[str]:
    env = {**os.environ, "WINNOW_WRITE_API_KEY": env_key, "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", str(corpus), "--server", url, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def test_ingest_server_killed_and_rerun(live: LiveServer, tmp_path: Path) -> None:
    n = 240
    recs = [
        {
            "_id": f"k{i:03d}",
            "title": f"Note {i}",
            "text": f"Note number {i} is about topic {i % 7}.",
        }
        for i in range(n)
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", recs)
    before = ready(live.url)["documents"]
    proc = ingest_cli(corpus, live.url)
    deadline = time.monotonic() + 300
    while ready(live.url)["documents"] < before + 20:  # some batches are in
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    mid = ready(live.url)["documents"] - before
    assert 0 < mid < n
    rerun = ingest_cli(corpus, live.url)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out + err
    assert ready(live.url)["documents"] - before == n
    rows = summary_rows(out)
    assert rows["documents"] == str(n) and rows["documents in collection"] == str(before + n)
    assert int(rows["unchanged (skipped)"]) >= mid - 64  # a batch in flight may have landed
    # nothing duplicated: one passage per document, each as in the corpus
    for i in (0, n // 2, n - 1):
        got = httpx.get(f"{live.url}/v1/documents/k{i:03d}", headers=R, timeout=60).json()[
            "passages"
        ]
        assert [p["text"] for p in got] == [recs[i]["text"]]
    # a third run changes nothing and embeds nothing
    third = ingest_cli(corpus, live.url)
    out3, err3 = third.communicate(timeout=600)
    assert third.returncode == 0, err3
    rows = summary_rows(out3)
    assert rows["unchanged (skipped)"] == str(n) and rows["embedded + upserted"] == "0"


def summary_rows(out: str) -> dict[str, str]:
    """The summary table's rows, name → value."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 4:
            rows[cells[1]] = cells[2]
    return rows


def test_ingest_server_with_a_read_key_says_so(live: LiveServer, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "rk", "text": "read key text"}])
    proc = ingest_cli(corpus, live.url, env_key="")
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 2 and "401" in err and "WINNOW_WRITE_API_KEY" in err, err


# --- a batch that fails half-way -------------------------------------------------------------------
def test_a_batch_failing_midway_reports_exactly_what_was_applied(tmp_path: Path, embedder) -> None:
    """Milvus fails on the second group's upsert: the first group is reported applied, the rest
    not_applied (503 partial_write); resending the batch finishes it, redoing only what is left."""
    from pipeline.api.errors import to_response
    from pipeline.store import MilvusStore, StoreUnavailable
    from pipeline.writes import PartialWrite, WriteService

    class FailingOnce(MilvusStore):
        calls = 0

        def upsert(self, passages, vectors):  # type: ignore[override]
            FailingOnce.calls += 1
            if FailingOnce.calls == 2:
                raise StoreUnavailable("Milvus went away")
            return super().upsert(passages, vectors)

    s = Settings(milvus_uri=str(tmp_path / "w.db"), embed_device="cpu", ingest_batch_size=2)
    store = FailingOnce(s.milvus_uri, "t")
    store.ensure_collection(embedder.dim, s.embed_model)
    writes = WriteService(s, embedder, store)
    docs = [Document(f"p{i}", f"Partial write document number {i}.") for i in range(5)]
    docs.insert(1, Document("empty", "  "))
    with pytest.raises(PartialWrite) as info:
        asyncio.run(writes.upsert(docs))
    exc = info.value
    assert sorted(r.id for r in exc.applied if r.status == "created") == ["p0", "p1"]
    assert [r.id for r in exc.applied if r.status == "rejected"] == ["empty"]
    assert exc.not_applied == ["p2", "p3", "p4"]
    response = to_response(exc)
    body = json.loads(response.body)
    assert response.status_code == 503 and body["error"]["type"] == "partial_write"
    assert body["not_applied"] == ["p2", "p3", "p4"] and len(body["results"]) == 3
    again = asyncio.run(writes.upsert(docs))
    assert [(r.id, r.status) for r in again] == [
        ("p0", "unchanged"),
        ("empty", "rejected"),
        ("p1", "unchanged"),
        ("p2", "created"),
        ("p3", "created"),
        ("p4", "created"),
    ]
    assert store.count_documents() == 5
    writes.close()
    store.close()
