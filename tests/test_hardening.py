"""Hostile input over real HTTP: auth before the body, body limits, bounded fields, short errors,
strict types, honest OpenAPI, and connections that never finish their headers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, batched
from test_api import app_settings, copy_db

from pipeline.api import create_app

pytestmark = pytest.mark.slow

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
INTERNALS = ("dense", "sparse", "search_text", "Recursion", "Traceback", "pymilvus")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, sample_db, embedder, tiny_engine) -> Iterator[LiveServer]:
    db = copy_db(sample_db, tmp_path_factory.mktemp("hard"))
    s = app_settings(
        db,
        api_key=KEY,
        max_body_bytes=64 * 1024,
        max_instruction_chars=300,
        max_filter_chars=1000,
        http_header_timeout=1.0,
        http_body_timeout=1.0,
    )
    app = create_app(s, embedder=embedder, reranker=batched(tiny_engine))
    with LiveServer(app) as server:
        yield server


def raw(port: int, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Send ``head`` (+ ``body``) on a fresh socket; read what the server answers within ``wait``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        out = b""
        try:
            while b"\r\n\r\n" not in out:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return out


def post_head(path: str, length: int | None, auth: bool, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BODY_PATHS = ["/v1/rerank", "/rerank", "/rerank/", "/v2/rerank", "/score", "/v1/score"]


@pytest.mark.parametrize("path", BODY_PATHS)
def test_auth_is_checked_before_the_body_is_read(guarded: LiveServer, path: str) -> None:
    """100 MB announced, nothing sent: the 401 comes from the headers alone."""
    t0 = time.monotonic()
    out = raw(guarded.port, post_head(path, 100_000_000, auth=False))
    assert out.startswith(b"HTTP/1.1 401"), out[:200]
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("path", BODY_PATHS)
def test_body_over_the_limit_is_refused_by_its_length(guarded: LiveServer, path: str) -> None:
    out = raw(guarded.port, post_head(path, 100_000_000, auth=True))
    assert out.startswith(b"HTTP/1.1 413"), out[:200]


def test_streamed_body_over_the_limit_is_refused_while_streaming(guarded: LiveServer) -> None:
    chunk = b"x" * 16_384
    with httpx.Client(timeout=10) as c:  # a generator body: chunked, no Content-Length

        def gen() -> Iterator[bytes]:
            yield b'{"query": "q", "documents": ["'
            for _ in range(8):
                yield chunk
            yield b'"]}'

        r = c.post(f"{guarded.url}/v1/rerank", content=gen(), headers=AUTH)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "body_too_large"


def test_a_stalled_body_gets_408(guarded: LiveServer) -> None:
    out = raw(guarded.port, post_head("/v1/search", 1000, auth=True), b'{"query": ', wait=5)
    assert out.startswith(b"HTTP/1.1 408"), out[:200]


def test_connections_that_never_finish_their_headers_are_closed(guarded: LiveServer) -> None:
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
        s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    t0 = time.monotonic()
    closed = 0
    for s in socks:
        try:
            if s.recv(1024) == b"":
                closed += 1
        except (ConnectionResetError, TimeoutError):
            closed += isinstance(s, socket.socket)
        s.close()
    assert closed == 20
    assert time.monotonic() - t0 < 4  # http_header_timeout=1 s, with slack for a loaded machine


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"query": "x", "filter": "doc_id == " + "9" * 5000}, "filter_too_long"),
        ({"query": "x", "filter": "(" * 400 + 'doc_id == "a"' + ")" * 400}, "invalid_filter"),
        ({"query": "x", "filter": "dense > 1"}, "invalid_filter"),
        ({"query": "x", "filter": "search_text like 'a%' and $$"}, "invalid_filter"),
        ({"query": "x", "instruction": "i" * 301}, "instruction_too_long"),
        ({"query": "   "}, "invalid_request"),
    ],
)
def test_bounded_fields_short_errors_no_internals(
    guarded: LiveServer, payload: dict, kind: str
) -> None:
    r = httpx.post(f"{guarded.url}/v1/search", json=payload, headers=AUTH, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == kind
    assert len(r.content) < 600
    message = r.json()["error"]["message"]
    said = message.split(" is not a valid expression")[-1]  # past the quoted excerpt of the input
    assert not any(word in said for word in INTERNALS), message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/rerank", {"query": "q", "documents": ["d"]}),
        ("/rerank", {"query": "q", "texts": ["d"]}),
        ("/score", {"text_1": "q", "text_2": ["d"]}),
    ],
)
def test_instruction_has_its_own_cap_on_rerank(guarded: LiveServer, path: str, body: dict) -> None:
    r = httpx.post(
        f"{guarded.url}{path}", json={**body, "instruction": "i" * 10_000}, headers=AUTH, timeout=60
    )
    assert r.status_code == 422 and r.json()["error"]["type"] == "instruction_too_long"


@pytest.mark.parametrize(
    "payload",
    [
        {"query": "x", "top_n": "5"},
        {"query": "x", "rerank": 0},
        {"query": "x", "hybrid": "yes"},
        {"query": 5},
    ],
)
def test_types_are_strict(guarded: LiveServer, payload: dict) -> None:
    r = httpx.post(f"{guarded.url}/v1/search", json=payload, headers=AUTH, timeout=60)
    assert r.status_code == 422, r.text


def test_invalid_json_and_utf8_are_400_or_422(guarded: LiveServer) -> None:
    for body in (b"\xff\xfe{", b'{"query": '):
        r = httpx.post(
            f"{guarded.url}/v1/search",
            content=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code in (400, 422), r.text
        assert r.json()["error"]["type"]


def test_openapi_tells_the_truth(guarded: LiveServer) -> None:
    doc = httpx.get(f"{guarded.url}/openapi.json", timeout=60).json()
    search = doc["components"]["schemas"]["SearchBody"]["properties"]
    top_k = next(b for b in search["top_k"]["anyOf"] if b.get("type") == "integer")
    assert top_k["maximum"] == 1000
    assert search["instruction"]["anyOf"][0]["maxLength"] == 300
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/search"]["post"]["security"] == [{"bearer": []}]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_openapi_declares_no_auth_without_a_key(tmp_path: Path, sample_db, embedder) -> None:
    app = create_app(app_settings(copy_db(sample_db, tmp_path), rerank=False), embedder=embedder)
    doc = app.openapi()
    assert "securitySchemes" not in doc["components"]
    assert "401" not in doc["paths"]["/v1/search"]["post"]["responses"]
