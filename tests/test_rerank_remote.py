"""The remote reranker over real HTTP.

Instance A is a real Winnow app with the tiny Qwen3 reranker serving ``/v1/rerank``; the remote
backend pointed at it must return exactly what A's engine computes locally, and so must a second
Winnow (B) that reranks through A. Failure paths (server down, blackhole, 429 + Retry-After, 4xx,
invalid answers) and the ``vllm serve`` answer shape use small FastAPI servers written here — the
fakes the issue allows — still over real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, batched, free_port
from fastapi import FastAPI, Request
from fastapi.responses import Response

from pipeline.config import Settings
from pipeline.domain import join_title
from pipeline.rerank.backends.remote.client import health_url, parse_retry_after, split_urls
from pipeline.rerank.backends.remote.formats import build_payload, parse_results
from pipeline.rerank.backends.remote.reranker import RemoteReranker
from pipeline.rerank.base import (
    InstructionNotSupported,
    Reranker,
    RerankerError,
    RerankerUnavailable,
)
from pipeline.rerank.cache import CachedReranker, unwrap
from pipeline.rerank.factory import build_reranker
from pipeline.rerank.prompt import (
    DEFAULT_INSTRUCTION,
    PREFIX,
    SUFFIX,
    PromptTooLong,
    format_body,
    format_document,
    format_pair,
    format_query,
)
from testkit.shared_dir import QWEN3_TOKENIZER

QUERY = "what makes plants produce oxygen?"
DOCS = [
    "Plants use chlorophyll to turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "A volcano is a rupture in the crust of a planet where lava escapes.",
    "Tides are caused by the gravitational pull of the moon.",
    "Coffee is brewed from roasted coffee beans.",
    "Python is a programming language.",
    "Photosynthesis happens in the chloroplasts of leaf cells.",
    "The marathon is a long-distance race of 42.195 kilometres.",
    "Oxygen is released when water molecules are split during the light reactions.",
    "",
    "北京是中国的首都。",
]
CUSTOM = "Given a biology question, retrieve passages that explain the mechanism"
TOKENIZER_DIR = QWEN3_TOKENIZER


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def score_and_close(r: RemoteReranker, *args: Any) -> list[float]:
    try:
        return await r.score(*args)
    finally:
        await r.aclose()


def serve_on(app: FastAPI, port: int) -> LiveServer:
    """A LiveServer on a given port (to restart a server where the client expects it)."""
    return LiveServer(app, port=port)


# ================================================================================================
# Request building and answer parsing (no network)
# ================================================================================================


def test_payload_formats() -> None:
    w = build_payload("winnow", "q", ["a", "b"], None, None)
    assert w == {
        "query": "q",
        "documents": ["a", "b"],
        "instruction": DEFAULT_INSTRUCTION,
        "top_n": 2,
    }
    assert build_payload("winnow", "q", ["a"], CUSTOM, "m")["instruction"] == CUSTOM
    assert build_payload("winnow", "q", ["a"], CUSTOM, "m")["model"] == "m"

    f = build_payload("qwen3-formatted", "q {x}", ["a", "", "北京"], CUSTOM, None)
    assert "instruction" not in f and "model" not in f
    assert [f["query"] + d for d in f["documents"]] == [
        format_pair("q {x}", d, CUSTOM) for d in ["a", "", "北京"]
    ]
    assert f["query"] == format_query("q {x}", CUSTOM)
    assert f["documents"][0] == format_document("a")

    c = build_payload("cohere", "q", ["a"], None, "m")
    assert c == {"query": "q", "documents": ["a"], "top_n": 1, "model": "m"}
    assert build_payload("cohere", "q", ["a"], DEFAULT_INSTRUCTION, None)["query"] == "q"
    with pytest.raises(InstructionNotSupported, match="qwen3-formatted"):
        build_payload("cohere", "q", ["a"], CUSTOM, None)
    with pytest.raises(ValueError):
        build_payload("jina", "q", ["a"])


def test_parse_results_maps_by_index() -> None:
    answer = {
        "id": "rerank-1",
        "model": "m",
        "usage": {"total_tokens": 42},
        "results": [
            {"index": 2, "document": {"text": "c"}, "relevance_score": 0.9},
            {"index": 0, "document": {"text": "a"}, "relevance_score": 0.5},
            {"index": 1, "document": {"text": "b"}, "relevance_score": 0.1},
        ],
    }
    assert parse_results(answer, 3) == [0.5, 0.1, 0.9]
    assert parse_results({"results": [{"index": 0, "relevance_score": 1}]}, 1) == [1.0]


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ([{"index": 0, "relevance_score": 0.1}, {"index": 0, "relevance_score": 0.2}], "twice"),
        ([{"index": 0, "relevance_score": 0.1}], "left out"),
        ([{"index": 0, "relevance_score": 0.1}, {"index": 2, "relevance_score": 0.2}], "index 2"),
        (
            [{"index": 0, "relevance_score": float("nan")}, {"index": 1, "relevance_score": 0}],
            "nan",
        ),
        (
            [{"index": 0, "relevance_score": float("inf")}, {"index": 1, "relevance_score": 0}],
            "inf",
        ),
        ([{"index": 0, "relevance_score": "0.1"}, {"index": 1, "relevance_score": 0}], "'0.1'"),
        ([{"index": True, "relevance_score": 0.1}, {"index": 1, "relevance_score": 0}], "True"),
        ([{"index": -1, "relevance_score": 0.1}, {"index": 1, "relevance_score": 0}], "-1"),
        (None, "results"),
    ],
)
def test_parse_results_rejects_bad_answers(results: Any, match: str) -> None:
    with pytest.raises(RerankerError, match=match):
        parse_results({"results": results} if results is not None else {"data": []}, 2)


def test_retry_after_and_urls() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT")
    assert future is not None and future > 1e8
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert split_urls(" http://a:1/rerank , https://b/v1/rerank,") == [
        "http://a:1/rerank",
        "https://b/v1/rerank",
    ]
    for bad in ("", " , ", "reranker:8000/rerank", "ftp://x/rerank"):
        with pytest.raises(ValueError):
            split_urls(bad)
    assert health_url("http://reranker:8000/v1/rerank?x=1") == "http://reranker:8000/health"


def test_built_from_settings() -> None:
    s = Settings(
        rerank_backend="remote",
        rerank_url="http://a:8000/v1/rerank,http://b:8000/v1/rerank",
        rerank_api_key="k",
        rerank_remote_format="qwen3-formatted",
        rerank_remote_timeout=3.5,
        rerank_remote_max_documents=7,
        rerank_remote_retries=1,
    )
    cached = build_reranker(s.reranker)
    assert isinstance(cached, CachedReranker) and isinstance(cached, Reranker)  # score cache on
    r = unwrap(cached)
    assert isinstance(r, RemoteReranker) and isinstance(r, Reranker)
    assert r.backend == "remote" and r.urls == [
        "http://a:8000/v1/rerank",
        "http://b:8000/v1/rerank",
    ]
    assert (r.format, r.timeout, r.max_documents, r.retries) == ("qwen3-formatted", 3.5, 7, 1)
    assert r.model == s.rerank_model and r.remote_model is None
    r2 = RemoteReranker.from_settings(
        Settings(
            rerank_backend="remote", rerank_url="http://a/rerank", rerank_remote_model="m"
        ).reranker
    )
    assert r2.model == r2.remote_model == "m"
    assert Settings(rerank_api_key="").rerank_api_key is None  # blank = unset
    assert Settings(rerank_api_key="secret").non_default()["rerank_api_key"] == "***"
    with pytest.raises(ValueError, match="WINNOW_RERANK_URL"):
        build_reranker(Settings(rerank_backend="remote").reranker)


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="real Qwen3 tokenizer not present")
def test_formatted_sides_tokenize_like_the_card() -> None:
    """What ``vllm serve`` without a template scores — ``tokenizer(query_side, document_side)`` or
    the concatenated string — is token for token the card's prefix + body + suffix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    for q, d, i in [
        (QUERY, DOCS[0], None),
        ("q\n", "\n<doc>\n", CUSTOM),
        ("北京?", "北京是中国的首都。", "中文指令"),
        ("trailing space ", " leading space", None),
    ]:
        card = (
            tok.encode(PREFIX, add_special_tokens=False)
            + tok.encode(format_body(q, d, i), add_special_tokens=False)
            + tok.encode(SUFFIX, add_special_tokens=False)
        )
        qs, ds = format_query(q, i), format_document(d)
        assert tok(qs, ds, add_special_tokens=True)["input_ids"] == card
        assert tok(qs + ds, add_special_tokens=True)["input_ids"] == card


def test_tokenizer_for_settings() -> None:
    from pipeline.rerank.backends.remote.reranker import tokenizer_for

    base = {"rerank_backend": "remote", "rerank_url": "http://a/v1/rerank", "rerank_model": "m"}
    for fmt, want in (("qwen3-formatted", "m"), ("cohere", "m"), ("winnow", None)):
        assert tokenizer_for(Settings(**base, rerank_remote_format=fmt).reranker) == want
    assert tokenizer_for(Settings(**base, rerank_tokenizer="none").reranker) is None
    assert tokenizer_for(Settings(**base, rerank_tokenizer="/tok").reranker) == "/tok"
    r = RemoteReranker.from_settings(
        Settings(**base, rerank_remote_format="cohere", rerank_max_length=300).reranker
    )
    assert (r.tokenizer, r.max_length) == ("m", 300)


# ================================================================================================
# A fake rerank server (Cohere / vllm serve answer shape) for the failure paths
# ================================================================================================


def prompt_score(text: str) -> float:
    """A deterministic stand-in score that changes with every character of what was scored."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class FakeRerankServer:
    """Answers like ``vllm serve``: results sorted by score (so out of input order), each with
    ``document``, plus ``usage``. Without a chat template vLLM scores ``query + document``; so does
    this server. ``script`` holds canned answers to send first; ``hang`` never answers."""

    def __init__(self, *, key: str | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.script: list[tuple[int, dict[str, str], str]] = []
        self.hang = False
        self.key = key

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def app(self) -> FastAPI:
        app = FastAPI()

        async def rerank(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            if (
                self.key is not None
                and request.headers.get("authorization") != f"Bearer {self.key}"
            ):
                return Response('{"error": {"message": "bad key"}}', 401)
            if self.hang:
                for _ in range(200):  # until the client gives up (never past 10 s)
                    if await request.is_disconnected():
                        break
                    await asyncio.sleep(0.05)
                return Response("{}", 504)
            if self.script:
                status, headers, content = self.script.pop(0)
                return Response(content, status, headers, media_type="application/json")
            docs = body["documents"]
            scores = [prompt_score(body["query"] + d) for d in docs]
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            out = {
                "id": "rerank-fake",
                "model": body.get("model", "served"),
                "usage": {"total_tokens": 11 * len(docs)},
                "results": [
                    {"index": i, "document": {"text": docs[i]}, "relevance_score": scores[i]}
                    for i in order
                ],
            }
            return Response(json.dumps(out), 200, media_type="application/json")

        for path in ("/rerank", "/v1/rerank"):
            app.add_api_route(path, rerank, methods=["POST"])

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        return app


@pytest.fixture
def fake() -> Iterator[tuple[FakeRerankServer, LiveServer]]:
    f = FakeRerankServer()
    with LiveServer(f.app()) as server:
        yield f, server


def test_vllm_shape_parsed_and_formatted_request(fake) -> None:
    f, server = fake
    r = RemoteReranker(
        f"{server.url}/rerank",
        model="qwen3",
        remote_model="Qwen/Qwen3-Reranker-0.6B",
        fmt="qwen3-formatted",
        max_documents=4,
    )
    scores = run(score_and_close(r, QUERY, DOCS, CUSTOM))
    # the server scored exactly the card's prompt for each pair, and the scores came back in order
    assert scores == [prompt_score(format_pair(QUERY, d, CUSTOM)) for d in DOCS]
    assert f.calls == 3  # 10 documents, at most 4 per call
    assert sorted(len(b["documents"]) for b in f.bodies) == [2, 4, 4]
    for body in f.bodies:
        assert body["query"] == format_query(QUERY, CUSTOM)
        assert body["model"] == "Qwen/Qwen3-Reranker-0.6B"
        assert body["top_n"] == len(body["documents"])
        assert "instruction" not in body
    sent = sorted((d for b in f.bodies for d in b["documents"]), key=lambda d: d)
    assert sent == sorted(format_document(d) for d in DOCS)
    st = r.stats()
    assert (st["rerank_requests"], st["rerank_pairs"], st["remote_calls"]) == (1, 10, 3)
    assert st["remote_retries"] == st["remote_errors"] == 0
    assert st["remote_latency_seconds_count"] == 3 and st["remote_latency_seconds_sum"] > 0


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="real Qwen3 tokenizer not present")
def test_long_documents_are_cut_like_the_card_before_they_are_sent(fake) -> None:
    """vllm serve refuses a prompt over --max-model-len; the client cuts by the card's rule instead:
    what the server tokenizes is the card's tokens (suffix kept), short documents go out as given."""
    from transformers import AutoTokenizer

    from pipeline.rerank.prompt import body_budget, encode_fixed

    f, server = fake
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    max_len = 160
    long = " ".join(f"word{i} alpha beta" for i in range(300))
    docs = [DOCS[0], long, "北京是中华人民共和国的首都，" * 40, ""]
    r = RemoteReranker(
        f"{server.url}/v1/rerank",
        model="m",
        fmt="qwen3-formatted",
        tokenizer=str(TOKENIZER_DIR),
        max_length=max_len,
    )
    r.load()
    run(score_and_close(r, QUERY, docs, CUSTOM))
    (body,) = f.bodies
    prefix, suffix = encode_fixed(tok)
    budget = body_budget(max_len, prefix, suffix)
    for sent, doc in zip(body["documents"], docs, strict=True):
        ids = tok(body["query"] + sent)["input_ids"]
        card = tok([format_body(QUERY, doc, CUSTOM)], truncation="longest_first", max_length=budget)
        want = prefix + card["input_ids"][0] + suffix
        assert len(ids) <= max_len and ids[-len(suffix) :] == suffix
        if doc is not docs[2]:
            assert ids == want, doc[:40]
        else:  # a cut inside a multi-byte character drops at most its 3 trailing byte tokens
            assert want[: len(ids) - len(suffix)] == ids[: -len(suffix)]
            assert len(want) - len(ids) <= 3
    assert body["documents"][0] == format_document(DOCS[0]) and body["documents"][
        3
    ] == format_document("")
    assert r._cutter is not None and r._cutter.cut_documents == 2
    with pytest.raises(PromptTooLong):  # only documents are cut: an oversized query is refused
        run(score_and_close(r, "why " * 200, ["a"]))
    assert f.calls == 1


def test_cohere_format_and_api_key() -> None:
    f = FakeRerankServer(key="s3cret")
    with LiveServer(f.app()) as server:
        r = RemoteReranker(f"{server.url}/v1/rerank", model="m", api_key="s3cret", fmt="cohere")
        with pytest.raises(InstructionNotSupported):
            run(score_and_close(r, QUERY, DOCS, CUSTOM))
        assert f.calls == 0  # refused before any call
        scores = run(score_and_close(r, QUERY, DOCS[:3], None))
        assert scores == [prompt_score(QUERY + d) for d in DOCS[:3]]
        assert f.bodies[-1] == {"query": QUERY, "documents": DOCS[:3], "top_n": 3}
        assert f.auth[-1] == "Bearer s3cret"

        wrong = RemoteReranker(f"{server.url}/v1/rerank", model="m", api_key="nope", retries=3)
        with pytest.raises(RerankerError, match="WINNOW_RERANK_API_KEY") as err:
            run(score_and_close(wrong, QUERY, DOCS[:1]))
        assert err.value.status == 401
        assert f.calls == 2  # a 401 is not retried


def test_4xx_not_retried_and_bad_answers_refused(fake) -> None:
    f, server = fake
    r = RemoteReranker(f"{server.url}/rerank", model="m", retries=3)
    f.script = [(400, {}, '{"error": {"message": "documents too long", "type": "BadRequest"}}')]
    with pytest.raises(RerankerError, match="documents too long") as err:
        run(score_and_close(r, QUERY, DOCS[:2]))
    assert err.value.status == 400 and f.calls == 1

    f.script = [(200, {}, '{"results": [{"index": 0, "relevance_score": NaN}]}')]
    with pytest.raises(RerankerError, match="nan"):
        run(score_and_close(r, QUERY, DOCS[:1]))
    f.script = [(200, {}, '{"results": [{"index": 1, "relevance_score": 0.5}]}')]
    with pytest.raises(RerankerError, match="left out"):
        run(score_and_close(r, QUERY, DOCS[:2]))
    f.script = [(200, {}, "<html>oops</html>")]
    with pytest.raises(RerankerError, match="non-JSON"):
        run(score_and_close(r, QUERY, DOCS[:1]))
    assert f.calls == 4
    assert r.stats()["remote_errors"] == 4


def test_429_retry_after_is_honoured_within_the_deadline(fake) -> None:
    f, server = fake
    r = RemoteReranker(f"{server.url}/rerank", model="m", timeout=5.0, retries=2)
    f.script = [(429, {"Retry-After": "1"}, '{"error": {"message": "busy"}}')]
    t0 = time.monotonic()
    scores = run(score_and_close(r, QUERY, DOCS[:3]))
    waited = time.monotonic() - t0
    assert scores == [prompt_score(QUERY + d) for d in DOCS[:3]]
    assert f.calls == 2 and r.stats()["remote_retries"] == 1
    assert waited >= 0.9  # it waited as told before trying again

    # 503 without Retry-After: backoff, then success
    f.script = [(503, {}, "{}"), (503, {}, "{}")]
    assert run(score_and_close(r, QUERY, DOCS[:1])) == [prompt_score(QUERY + DOCS[0])]
    assert f.calls == 5

    # told to come back after the deadline: give up now, passing the server's hint on
    f.script = [(429, {"Retry-After": "30"}, "{}")]
    t0 = time.monotonic()
    with pytest.raises(RerankerUnavailable) as err:
        run(score_and_close(r, QUERY, DOCS[:1]))
    assert time.monotonic() - t0 < 4.0
    assert err.value.retry_after >= 25


def test_blackhole_gives_up_at_the_deadline(fake) -> None:
    f, server = fake
    f.hang = True
    r = RemoteReranker(f"{server.url}/rerank", model="m", timeout=1.0, retries=5)
    t0 = time.monotonic()
    with pytest.raises(RerankerUnavailable, match="1s"):
        run(score_and_close(r, QUERY, DOCS[:2]))
    assert time.monotonic() - t0 < 1.0 + 1.5  # the deadline plus slack, never a hang
    assert r.stats()["remote_unavailable"] == 1


def test_several_urls_share_the_load_and_skip_a_dead_one() -> None:
    f1, f2 = FakeRerankServer(), FakeRerankServer()
    dead = f"http://127.0.0.1:{free_port()}/rerank"  # nothing listens there
    with LiveServer(f1.app()) as s1, LiveServer(f2.app()) as s2:
        r = RemoteReranker(
            [dead, f"{s1.url}/rerank", f"{s2.url}/rerank"], model="m", max_documents=1, retries=2
        )

        async def many() -> list[list[float]]:
            try:
                return [await r.score(QUERY, DOCS[:4]) for _ in range(5)]
            finally:
                await r.aclose()

        results = run(many())
        assert all(res == [prompt_score(QUERY + d) for d in DOCS[:4]] for res in results)
        assert f1.calls + f2.calls == 20
        assert min(f1.calls, f2.calls) >= 4  # least busy, round robin among equals
        st = r.stats()
        # the dead one: tried, then avoided while it backs off (at most twice per round of 4)
        assert 1 <= st["remote_errors"] == st["remote_retries"] <= 10

        async def health() -> bool:
            try:
                return await r.health()
            finally:
                await r.aclose()

        assert run(health()) is True


# ================================================================================================
# Against a real Winnow (tiny Qwen3): exact scores, search through the remote, down and back up
# ================================================================================================


def winnow_settings(db: Path, **kw: Any) -> Settings:
    return Settings(milvus_uri=str(db), embed_device="cpu", rerank_device="cpu", **kw)


def copy_db(sample_db: Path, dst: Path) -> Path:
    shutil.copytree(sample_db, dst) if sample_db.is_dir() else shutil.copy(sample_db, dst)
    return dst


def winnow_app(db: Path, embedder: Any, reranker: Any, **kw: Any) -> FastAPI:
    from pipeline.api import create_app

    return create_app(winnow_settings(db, **kw), embedder=embedder, reranker=reranker)


def remote_winnow_app(db: Path, embedder: Any, url: str, **kw: Any) -> FastAPI:
    """A Winnow whose remote reranker is built from settings, as ``serve`` builds it, so the app
    owns it and closes its session on shutdown."""
    return winnow_app(db, embedder, None, rerank_backend="remote", rerank_url=url, **kw)


@pytest.fixture(scope="module")
def winnow_a(tmp_path_factory, sample_db, embedder, tiny_engine) -> Iterator[LiveServer]:
    """Instance A: a Winnow with the tiny Qwen3 reranker, serving /v1/rerank."""
    db = copy_db(sample_db, tmp_path_factory.mktemp("winnow-a") / "a.db")
    app = winnow_app(db, embedder, batched(tiny_engine), max_documents=40)
    with LiveServer(app) as server:
        yield server


@pytest.mark.slow
def test_remote_scores_equal_the_engine(winnow_a: LiveServer, tiny_engine) -> None:
    for instruction in (None, CUSTOM):
        want = tiny_engine.score(QUERY, DOCS, instruction)
        whole = RemoteReranker(f"{winnow_a.url}/v1/rerank", model="tiny")
        assert run(score_and_close(whole, QUERY, DOCS, instruction)) == pytest.approx(
            want, abs=1e-6
        )
        split = RemoteReranker(f"{winnow_a.url}/v1/rerank", model="tiny", max_documents=3)
        got = run(score_and_close(split, QUERY, DOCS, instruction))
        assert split.stats()["remote_calls"] == 4  # 10 documents in calls of ≤ 3, re-joined
        assert got == pytest.approx(want, abs=1e-6)
        assert sorted(range(10), key=lambda i: -got[i]) == sorted(range(10), key=lambda i: -want[i])
    # the instruction really travels: it changes the scores
    assert tiny_engine.score(QUERY, DOCS, CUSTOM) != pytest.approx(
        tiny_engine.score(QUERY, DOCS, None), abs=1e-6
    )


@pytest.mark.slow
def test_second_winnow_reranks_through_the_first(
    tmp_path, winnow_a: LiveServer, sample_db, embedder, tiny_engine
) -> None:
    app = remote_winnow_app(
        copy_db(sample_db, tmp_path / "b.db"),
        embedder,
        f"{winnow_a.url}/v1/rerank",
        rerank_remote_model="tiny-via-a",
        rerank_remote_max_documents=4,
    )
    with LiveServer(app) as b:
        remote = unwrap(app.state.winnow.runtime.reranker)
        assert isinstance(remote, RemoteReranker) and remote.max_documents == 4
        ready = httpx.get(f"{b.url}/ready", timeout=60).json()
        assert ready["ready"] and ready["rerank_backend"] == "remote"

        body = httpx.post(
            f"{b.url}/v1/search", json={"query": QUERY, "top_k": 6, "top_n": 6}, timeout=60
        ).json()
        res = body["results"]
        assert body["reranked"] and len(res) == 6
        direct = tiny_engine.score(
            QUERY, [join_title(h["title"], h["text"]) for h in res], Settings().rerank_instruction
        )
        assert [h["score"] for h in res] == pytest.approx(direct, abs=1e-6)

        req = {"query": QUERY, "documents": DOCS, "instruction": CUSTOM, "return_documents": True}
        via_b = httpx.post(f"{b.url}/v1/rerank", json=req, timeout=60).json()
        via_a = httpx.post(f"{winnow_a.url}/v1/rerank", json=req, timeout=60).json()
        assert [x["index"] for x in via_b["results"]] == [x["index"] for x in via_a["results"]]
        want = tiny_engine.score(QUERY, DOCS, CUSTOM)
        for x in via_b["results"]:
            assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-6)
            assert x["document"]["text"] == DOCS[x["index"]]
        assert via_b["model"] == "tiny-via-a"
    assert remote.stats()["rerank_requests"] == 2


@pytest.mark.slow
def test_remote_down_then_back(tmp_path, sample_db, embedder, tiny_engine) -> None:
    db = copy_db(sample_db, tmp_path / "a.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/rerank"
    want = tiny_engine.score(QUERY, DOCS[:4], None)
    r = RemoteReranker(url, model="tiny", timeout=3.0, retries=3)

    async def check(expect_up: bool) -> None:
        assert await r.health() is expect_up
        if expect_up:
            assert await r.score(QUERY, DOCS[:4]) == pytest.approx(want, abs=1e-6)
            return
        t0 = time.monotonic()
        with pytest.raises(RerankerUnavailable):
            await r.score(QUERY, DOCS[:4])
        assert time.monotonic() - t0 < 3.0 + 1.0  # within the deadline (+ slack)

    async def scenario(steps: list[Callable[[], Any]]) -> None:
        try:
            for step in steps:
                await step()
        finally:
            await r.aclose()

    with serve_on(winnow_app(db, embedder, batched(tiny_engine)), port):
        run(scenario([lambda: check(True)]))  # keeps pooled connections to the first server
    run(scenario([lambda: check(False), lambda: check(False)]))
    with serve_on(winnow_app(db, embedder, batched(tiny_engine)), port):
        run(scenario([lambda: check(True)]))  # same port, fresh server: recovers by itself

    # also within one loop: pooled connections to a server that went away are replaced
    async def one_loop() -> None:
        try:
            await check(False)
            with serve_on(winnow_app(db, embedder, batched(tiny_engine)), port):
                await asyncio.sleep(0)
                await check(True)
        finally:
            await r.aclose()

    run(one_loop())
    st = r.stats()
    assert st["remote_unavailable"] == 3 and st["remote_retries"] >= 3


@pytest.mark.slow
def test_app_answers_503_when_the_remote_is_down(tmp_path, sample_db, embedder) -> None:
    app = remote_winnow_app(
        copy_db(sample_db, tmp_path / "b.db"),
        embedder,
        f"http://127.0.0.1:{free_port()}/v1/rerank",
        rerank_remote_timeout=2.0,
    )
    with LiveServer(app) as b:
        t0 = time.monotonic()
        resp = httpx.post(f"{b.url}/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=30)
        assert time.monotonic() - t0 < 2.0 + 1.5
        assert resp.status_code == 503
        assert resp.json()["error"]["type"] == "reranker_unavailable"
        assert "Retry-After" in resp.headers
        search = httpx.post(f"{b.url}/v1/search", json={"query": "tides"}, timeout=30)
        assert search.status_code == 503


@pytest.mark.slow
def test_a_dead_remote_fails_fast_once_the_breaker_opens_then_recovers(
    tmp_path, sample_db, embedder, tiny_engine
) -> None:
    """Issue 27, item 6: a remote that refuses connections cost each request 3.5-7.2 s of retries.
    Now the first request opens the breaker, the next ones get 503 in milliseconds (over real HTTP,
    through a Winnow whose reranker is that remote), and once a real server listens on the port
    again one request after the cool-down closes the breaker: 200."""
    port = free_port()
    cooldown = 1.0
    app = remote_winnow_app(
        copy_db(sample_db, tmp_path / "b.db"),
        embedder,
        f"http://127.0.0.1:{port}/v1/rerank",
        rerank_remote_timeout=10.0,
        rerank_remote_breaker_cooldown=cooldown,
    )
    req = {"query": QUERY, "documents": DOCS[:4]}
    with LiveServer(app) as b, httpx.Client(base_url=b.url, timeout=30) as http:
        took = []
        for _ in range(10):
            t0 = time.monotonic()
            resp = http.post("/v1/rerank", json=req)
            took.append(time.monotonic() - t0)
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["type"] == "reranker_unavailable"
            assert int(resp.headers["Retry-After"]) >= 1
        metrics = http.get("/metrics").text
        assert 'winnow_breaker_state{breaker="rerank_remote"} 2.0' in metrics
        assert 'winnow_breaker_opened_total{breaker="rerank_remote"} 1.0' in metrics

        db = copy_db(sample_db, tmp_path / "a.db")
        with serve_on(winnow_app(db, embedder, batched(tiny_engine)), port):
            back = time.monotonic()
            while True:
                resp = http.post("/v1/rerank", json=req)
                if resp.status_code == 200 or time.monotonic() - back > cooldown + 10:
                    break
                time.sleep(0.1)
            recovered = time.monotonic() - back
            assert resp.status_code == 200, resp.text
            want = tiny_engine.score(QUERY, DOCS[:4], None)
            got = {x["index"]: x["relevance_score"] for x in resp.json()["results"]}
            assert [got[i] for i in range(4)] == pytest.approx(want, abs=1e-6)
            assert 'breaker="rerank_remote"} 0.0' in http.get("/metrics").text
    rest = sorted(took[1:])
    print(
        f"\ndead remote: first request {took[0] * 1000:.0f} ms, then median "
        f"{rest[len(rest) // 2] * 1000:.1f} ms, max {rest[-1] * 1000:.1f} ms; "
        f"200 again {recovered:.2f}s after the server came back"
    )
    assert max(rest) < 0.5  # generous: refused without a single connection attempt
    assert recovered <= cooldown + 5.0
