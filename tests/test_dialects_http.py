"""Every rerank dialect over real HTTP (uvicorn on loopback, tiny Qwen3 reranker), each answer equal to a
direct ``/v1/rerank`` of the same pairs; real third-party clients of TEI, vLLM and Infinity against it."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest
from conftest import LiveServer, batched, corpus_records
from test_api import app_settings, copy_db

from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.rerank.prompt import encode_bodies, encode_fixed, format_body
from pipeline.runtime import machine_defaults

pytestmark = pytest.mark.slow

KEY = "dialect-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DOCS = [r["text"] for r in corpus_records()]
QUERY = "why does the sea level rise and fall?"


@pytest.fixture(scope="module")
def live(tmp_path_factory, sample_db, embedder, tiny_engine) -> Iterator[LiveServer]:
    db = copy_db(sample_db, tmp_path_factory.mktemp("dialects"))
    s = app_settings(db, max_documents=40, rerank_max_wait_ms=5, api_key=KEY, rerank_cache_mb=8)
    app = create_app(s, embedder=embedder, reranker=batched(tiny_engine, max_wait_ms=5))
    with LiveServer(app) as server:
        yield server


@pytest.fixture()
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        yield c


def direct(client: httpx.Client, query: str, docs: list[str]) -> dict[int, float]:
    """index → P(yes) from the reference route, /v1/rerank with the Cohere body."""
    r = client.post("/v1/rerank", json={"query": query, "documents": docs})
    assert r.status_code == 200, r.text
    return {x["index"]: x["relevance_score"] for x in r.json()["results"]}


def card_tokens(tiny_engine, query: str, docs: list[str]) -> int:
    """Prompt tokens as the model card forms them (prefix + body cut to budget + suffix)."""
    tok = tiny_engine.document_cutter().tokenizer
    prefix, suffix = encode_fixed(tok)
    budget = Settings().rerank_max_length - len(prefix) - len(suffix)
    bodies = encode_bodies(tok, [format_body(query, d) for d in docs], budget)
    return sum(len(prefix) + len(b) + len(suffix) for b in bodies)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank", "/rerank/", "/v1/rerank/"])
def test_documents_dialect_on_every_path(client: httpx.Client, path: str, tiny_engine) -> None:
    expect = direct(client, QUERY, DOCS)
    r = client.post(path, json={"query": QUERY, "documents": DOCS, "return_documents": True})
    assert r.status_code == 200, r.text  # a trailing slash is served, never a 307
    out = r.json()
    assert [x["index"] for x in out["results"]] == sorted(expect, key=expect.get, reverse=True)
    for x in out["results"]:
        assert x["relevance_score"] == pytest.approx(expect[x["index"]], abs=1e-6)
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert out["object"] == "rerank" and isinstance(out["created"], int)
    tokens = card_tokens(tiny_engine, QUERY, DOCS)
    assert out["usage"] == {"documents": len(DOCS), "prompt_tokens": tokens, "total_tokens": tokens}


def test_usage_counts_cached_pairs_in_full(client: httpx.Client) -> None:
    body = {"query": "cache me", "documents": DOCS[:3]}
    first = client.post("/v1/rerank", json=body).json()["usage"]
    again = client.post("/v1/rerank", json=body).json()["usage"]  # every pair from the cache now
    assert first == again and first["prompt_tokens"] > 0


def test_top_n_zero_is_all_and_top_n_cuts(client: httpx.Client) -> None:
    everything = client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 0})
    assert everything.status_code == 200, everything.text
    assert len(everything.json()["results"]) == len(DOCS)
    two = client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [x["index"] for x in two["results"]] == [
        x["index"] for x in everything.json()["results"][:2]
    ]


def test_cohere_v1_rank_fields(client: httpx.Client) -> None:
    records = corpus_records()
    objs = [{"title": r["title"], "body": r["text"], "n": i} for i, r in enumerate(records)]
    r = client.post(
        "/v1/rerank", json={"query": QUERY, "documents": objs, "rank_fields": ["title", "body"]}
    )
    assert r.status_code == 200, r.text
    texts = [f"{r['title']}\n{r['text']}" for r in records]
    expect = direct(client, QUERY, texts)
    for x in r.json()["results"]:
        assert x["relevance_score"] == pytest.approx(expect[x["index"]], abs=1e-6)
    missing = client.post(
        "/v1/rerank", json={"query": QUERY, "documents": objs, "rank_fields": ["nope"]}
    )
    assert missing.status_code == 422 and "rank_fields" in missing.json()["detail"]


def test_cohere_v1_sdk_with_rank_fields(live: LiveServer) -> None:
    """The cohere SDK's v1 Client (POST /v1/rerank) with object documents and rank_fields."""
    import cohere

    co = cohere.Client(base_url=live.url, api_key=KEY)
    records = corpus_records()
    objs = [{"title": r["title"], "body": r["text"]} for r in records]
    resp = co.rerank(model="m", query=QUERY, documents=objs, rank_fields=["title", "body"], top_n=2)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        expect = direct(c, QUERY, [f"{r['title']}\n{r['text']}" for r in records])
    assert [r.index for r in resp.results] == sorted(expect, key=expect.get, reverse=True)[:2]
    for r in resp.results:
        assert r.relevance_score == pytest.approx(expect[r.index], abs=1e-6)


def test_windows_on_every_dialect(client: httpx.Client) -> None:
    long = "filler words about nothing much. " * 1500 + "The moon's gravity drives ocean tides."
    docs = [long, DOCS[0]]
    ref = client.post(
        "/v1/rerank", json={"query": "tides", "documents": docs, "max_chunks_per_doc": 4}
    ).json()
    expect = {x["index"]: x["relevance_score"] for x in ref["results"]}
    assert any("best_window" in x for x in ref["results"])
    tei = client.post(
        "/rerank", json={"query": "tides", "texts": docs, "max_chunks_per_doc": 4}
    ).json()
    assert {x["index"]: x["score"] for x in tei} == pytest.approx(expect, abs=1e-6)
    score = client.post(
        "/score", json={"text_1": "tides", "text_2": docs, "max_chunks_per_doc": 4}
    ).json()
    assert {d["index"]: d["score"] for d in score["data"]} == pytest.approx(expect, abs=1e-6)


def test_infinity_raw_scores(client: httpx.Client) -> None:
    expect = direct(client, QUERY, DOCS)
    r = client.post("/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": True})
    for x in r.json()["results"]:
        p = expect[x["index"]]
        assert x["relevance_score"] == pytest.approx(math.log(p / (1 - p)), abs=1e-4)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/rerank/"])
def test_tei_dialect(client: httpx.Client, path: str) -> None:
    expect = direct(client, QUERY, DOCS)
    r = client.post(path, json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert isinstance(ranks, list) and len(ranks) == len(DOCS)  # TEI's bare list, best first
    assert [x["index"] for x in ranks] == sorted(expect, key=expect.get, reverse=True)
    for x in ranks:
        assert set(x) == {"index", "score", "text"} and x["text"] == DOCS[x["index"]]
        assert x["score"] == pytest.approx(expect[x["index"]], abs=1e-6)
    raw = client.post(path, json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    for x in raw:
        p = expect[x["index"]]
        assert "text" not in x
        assert x["score"] == pytest.approx(math.log(p) - math.log1p(-p), abs=1e-4)


def test_tei_truncation(client: httpx.Client) -> None:
    long = ["tide " * 30_000]  # over WINNOW_MAX_DOCUMENT_CHARS (100,000)
    cut = client.post("/rerank", json={"query": "tides", "texts": long, "truncate": True})
    assert cut.status_code == 200, cut.text
    auto = client.post("/rerank", json={"query": "tides", "texts": long})  # TEI --auto-truncate
    assert auto.json()[0]["score"] == pytest.approx(cut.json()[0]["score"], abs=1e-6)
    refused = client.post("/rerank", json={"query": "tides", "texts": long, "truncate": False})
    assert refused.status_code == 422 and "truncate" in refused.json()["detail"]
    for direction in ("Right", "right"):
        body = {"query": "q", "texts": ["d"], "truncation_direction": direction}
        assert client.post("/rerank", json=body).status_code == 200
    left = client.post(
        "/rerank", json={"query": "q", "texts": ["d"], "truncation_direction": "Left"}
    )
    assert left.status_code == 422 and "truncation_direction" in left.json()["detail"]


@pytest.mark.parametrize("path", ["/score", "/v1/score", "/score/"])
@pytest.mark.parametrize(
    ("first", "second"),
    [("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")],
)
def test_score_one_to_n(client: httpx.Client, path: str, first: str, second: str) -> None:
    expect = direct(client, QUERY, DOCS)
    for query in (QUERY, [QUERY]):  # a single string or a list of one: broadcast
        r = client.post(path, json={first: query, second: DOCS})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "list" and out["id"] and isinstance(out["created"], int)
        assert [d["index"] for d in out["data"]] == list(range(len(DOCS)))  # input order
        for d in out["data"]:
            assert d["object"] == "score"
            assert d["score"] == pytest.approx(expect[d["index"]], abs=1e-6)
        assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0


def test_score_pairwise_and_shapes(client: httpx.Client, tiny_engine) -> None:
    queries = ["tides", "coffee", "volcano"]
    docs = DOCS[:3]
    r = client.post("/score", json={"text_1": queries, "text_2": docs})
    assert r.status_code == 200, r.text
    for d in r.json()["data"]:
        i = d["index"]
        assert d["score"] == pytest.approx(direct(client, queries[i], [docs[i]])[0], abs=1e-6)
    tokens = sum(card_tokens(tiny_engine, q, [d]) for q, d in zip(queries, docs, strict=True))
    assert r.json()["usage"]["prompt_tokens"] == tokens
    raw = client.post(
        "/score", json={"text_1": queries, "text_2": docs, "use_activation": False}
    ).json()
    for plain, logit in zip(r.json()["data"], raw["data"], strict=True):
        p = plain["score"]
        assert logit["score"] == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
    bad = client.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert bad.status_code == 422 and "1:N" in bad.json()["detail"]
    assert client.post("/score", json={"text_1": "a"}).status_code == 422
    too_many = client.post("/score", json={"text_1": "a", "text_2": ["d"] * 41})
    assert too_many.status_code == 413 and "WINNOW_MAX_DOCUMENTS" in too_many.json()["detail"]


def test_info_and_models(client: httpx.Client) -> None:
    info = client.get("/info")
    assert info.status_code == 200, info.text
    body = info.json()
    assert "reranker" in body["model_type"] and body["max_client_batch_size"] == 40
    # the pair length this server runs: the hf engine on a CPU defaults to 2048 (machine_defaults)
    assert body["max_input_length"] == machine_defaults(Settings()).rerank_max_length
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-qwen3-reranker"


def test_errors_carry_error_and_detail(client: httpx.Client) -> None:
    for path, body in [
        ("/v1/rerank", {"query": "", "documents": ["d"]}),
        ("/rerank", {"query": "q", "texts": []}),
        ("/score", {"queries": "q", "documents": []}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        out = r.json()
        assert out["error"]["type"] == "invalid_request"
        assert out["detail"] == out["error"]["message"] and "tei." not in out["detail"]
    assert (
        client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 41})
        .json()["detail"]
        .startswith("41 documents")
    )


def test_every_new_route_is_guarded(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as anon:
        for method, path in [
            ("POST", "/rerank"),
            ("POST", "/rerank/"),
            ("POST", "/score"),
            ("POST", "/v1/score"),
            ("GET", "/info"),
            ("GET", "/v1/models"),
        ]:
            r = anon.request(method, path, json={"query": "q", "texts": ["d"]})
            assert r.status_code == 401, (path, r.status_code)
            assert r.json()["detail"].startswith("missing or wrong API key")


def test_openapi_lists_every_route(live: LiveServer) -> None:
    paths = httpx.get(f"{live.url}/openapi.json", timeout=60).json()["paths"]
    for p in ("/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score", "/info", "/v1/models"):
        assert p in paths, p
        for op in paths[p].values():
            assert op["security"] == [{"bearer": []}]
    assert not any(p.endswith("/") and p != "/" for p in paths)


# --- Task 2 (issue 27 item 4): a lone surrogate anywhere is a 422 naming the field -----------------

BAD = '"\\ud800x"'  # the JSON escape of a lone UTF-16 surrogate, as a client sends it


@pytest.mark.parametrize(
    ("path", "template", "field"),
    [
        ("/v1/rerank", '{"query": %s, "documents": ["d"]}', "query"),
        ("/v1/rerank", '{"query": "q", "documents": ["d", %s]}', "documents[1]"),
        ("/v1/rerank", '{"query": "q", "documents": [{"text": %s}]}', "documents[0].text"),
        ("/v1/rerank", '{"query": "q", "documents": ["d"], "instruction": %s}', "instruction"),
        ("/rerank", '{"query": "q", "texts": ["a", %s]}', "texts[1]"),
        ("/score", '{"text_1": "q", "text_2": [%s]}', "text_2[0]"),
        ("/v1/score", '{"queries": [%s], "documents": ["d"]}', "queries[0]"),
        ("/v1/search", '{"query": "q", "filter": %s}', "filter"),
        ("/v1/search", '{"query": "q", "instruction": %s}', "instruction"),
        ("/v1/rerank", '{"query": "q", "documents": ["d"], "meta": {"k": %s}}', "meta.k"),
    ],
)
def test_lone_surrogate_is_422_and_connection_stays(
    client: httpx.Client, path: str, template: str, field: str
) -> None:
    r = client.post(path, content=template % BAD, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"] and "Unicode" in r.json()["detail"]
    # the same keep-alive connection answers the next request
    ok = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert ok.status_code == 200 and ok.http_version == "HTTP/1.1"


# --- real third-party clients ----------------------------------------------------------------------


def test_tei_client_library(live: LiveServer) -> None:
    """tei-client (PyPI) checks GET /info for a reranker, then POSTs TEI's body to /rerank."""
    from tei_client import HttpClient

    tei = HttpClient(live.url, headers=AUTH, timeout=60)
    assert tei.health()
    ranks = tei.rerank(QUERY, DOCS, return_text=True).ranks
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        expect = direct(c, QUERY, DOCS)
    assert [r.index for r in ranks] == sorted(expect, key=expect.get, reverse=True)
    for r in ranks:
        assert r.score == pytest.approx(expect[r.index], abs=1e-6) and r.text == DOCS[r.index]


def test_rerankers_library_tei_provider(live: LiveServer) -> None:
    """rerankers' APIRanker, provider text-embeddings-inference: TEI's body at the URL it is given."""
    from rerankers.models.api_rankers import APIRanker

    ranker = APIRanker(
        "unused", api_key=KEY, api_provider="text-embeddings-inference", url=f"{live.url}/rerank"
    )
    out = ranker.rank(QUERY, DOCS)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        expect = direct(c, QUERY, DOCS)
    got = {r.document.doc_id: r.score for r in out.results}
    assert got == pytest.approx(expect, abs=1e-6)
    assert out.results[0].document.doc_id == max(expect, key=expect.get)


@pytest.mark.parametrize("provider", ["infinity", "hosted_vllm"])
def test_litellm_rerank(live: LiveServer, provider: str, monkeypatch) -> None:
    """LiteLLM's rerank() for Infinity and vLLM servers: both POST /rerank (and read usage tokens).

    Its infinity/ provider reads ``document`` as Infinity's bare string, where vLLM, Cohere and Jina
    send ``{"text": …}`` to the same body on the same path; Winnow answers the object (documented in
    the README), so this provider is used with return_documents=False.
    """
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list
    import litellm

    resp = litellm.rerank(
        model=f"{provider}/tiny-qwen3-reranker",
        query=QUERY,
        documents=DOCS,
        top_n=3,
        return_documents=provider != "infinity",
        api_base=live.url,
        api_key=KEY,
    )
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        expect = direct(c, QUERY, DOCS)
    order = sorted(expect, key=expect.get, reverse=True)[:3]
    assert [r["index"] for r in resp.results] == order
    for r in resp.results:
        assert r["relevance_score"] == pytest.approx(expect[r["index"]], abs=1e-6)
        if provider == "hosted_vllm":
            assert r["document"]["text"] == DOCS[r["index"]]
    if provider == "infinity":  # from Infinity's usage: prompt_tokens / total_tokens
        assert resp.meta["tokens"]["input_tokens"] > 0
