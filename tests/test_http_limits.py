"""Connection-level limits an unauthenticated client cannot exhaust (issue 27, item 2).

1,100 idle TCP connections that send nothing used to fill uvicorn's ``limit_concurrency`` (which
counts connections) until the header deadline closed them, and ``/health`` got 503. Now idle
connections do not count against request concurrency, past WINNOW_HTTP_MAX_CONNECTIONS the oldest
idle connection is evicted, and requests in progress are counted by the app (429 past the limit,
the ops routes never refused).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer

IDLE = 1100
FD_NEEDED = 2 * IDLE + 512  # client and server ends live in this process, plus the test's own


def raise_nofile(needed: int) -> None:
    """Raise the soft open-files limit (both socket ends are in this process), or skip."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"open-files hard limit {hard} < {needed} needed for {IDLE} idle sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that send nothing."""
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def wait_connections(live: LiveServer, at_least: int, within: float = 60.0) -> int:
    """Until the server has accepted ``at_least`` connections (the backlog drained)."""
    t0 = time.monotonic()
    while True:
        n = len(live.server.server_state.connections)
        if n >= at_least or time.monotonic() - t0 > within:
            return n
        time.sleep(0.05)


@pytest.fixture()
def app_settings(tmp_path: Path, sample_db: Path) -> Any:
    from pipeline.config import Settings

    db = tmp_path / "w.db"
    shutil.copytree(sample_db, db) if sample_db.is_dir() else shutil.copy(sample_db, db)
    return Settings(
        milvus_uri=str(db),
        rerank=False,
        embed_device="cpu",
        http_header_timeout=60.0,  # the idle sockets stay for the whole test: nothing reaps them
    )


@pytest.fixture()
def live(app_settings: Any, embedder: Any) -> Iterator[LiveServer]:
    from pipeline.api import create_app

    raise_nofile(FD_NEEDED)
    with LiveServer(create_app(app_settings, embedder=embedder, reranker=None)) as server:
        yield server


BODY = {"query": "how do plants make sugar", "top_n": 3, "rerank": False}


@pytest.mark.slow
def test_idle_connections_do_not_deny_health_or_search(live: LiveServer) -> None:
    socks = open_idle(live.port, IDLE)
    try:
        held = wait_connections(live, IDLE)
        assert held >= IDLE, f"the server accepted only {held} of {IDLE} connections"
        with httpx.Client(base_url=live.url, timeout=30) as http:
            times = []
            for _ in range(10):
                t0 = time.monotonic()
                r = http.get("/health")
                times.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
            t0 = time.monotonic()
            search = http.post("/v1/search", json=BODY)
            search_s = time.monotonic() - t0
            assert search.status_code == 200, search.text
            assert search.json()["results"][0]["doc_id"] == "photosynthesis"
            assert http.get("/ready").status_code == 200
        # the idle sockets were held all along (nothing closed them to make room)
        assert len(live.server.server_state.connections) >= IDLE
    finally:
        for s in socks:
            s.close()
    times.sort()
    print(
        f"\n{IDLE} idle sockets held: /health median {times[5] * 1000:.1f} ms, "
        f"max {times[-1] * 1000:.1f} ms; /v1/search {search_s * 1000:.0f} ms"
    )


@pytest.mark.slow
def test_past_the_connection_cap_the_oldest_idle_connection_is_evicted(
    app_settings: Any, embedder: Any
) -> None:
    from pipeline.api import create_app

    cap = 200
    settings = app_settings.model_copy(update={"http_max_connections": cap})
    raise_nofile(4 * cap + 512)
    with LiveServer(create_app(settings, embedder=embedder, reranker=None)) as live:
        first = open_idle(live.port, cap)
        later: list[socket.socket] = []
        try:
            assert wait_connections(live, cap) == cap
            later = open_idle(live.port, cap // 2)
            time.sleep(0.5)
            assert len(live.server.server_state.connections) <= cap
            with httpx.Client(base_url=live.url, timeout=30) as http:
                assert http.get("/health").status_code == 200
                assert http.post("/v1/search", json=BODY).status_code == 200
            # the oldest idle ones were closed (EOF), the newest are still open
            closed = sum(1 for s in first if _closed(s))
            assert closed >= cap // 2, f"{closed} of the {cap} oldest sockets closed"
            assert not any(_closed(s) for s in later[-10:])
        finally:
            for s in first + later:
                s.close()


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# --- requests in progress (a fast test of the middleware alone) --------------------------------


def test_requests_in_progress_are_capped_and_ops_routes_never_refused() -> None:
    from pipeline.api.guard import RequestLimit
    from pipeline.config import Settings

    release = asyncio.Event()

    async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limit = RequestLimit(slow_app, Settings(http_max_concurrency=2))

    async def call(path: str) -> tuple[int, dict[bytes, bytes]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await limit({"type": "http", "path": path}, None, send)
        return sent[0]["status"], dict(sent[0].get("headers", []))

    async def scenario() -> None:
        running = [asyncio.ensure_future(call("/v1/search")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert limit.inflight == 2
        status, headers = await call("/v1/rerank")
        assert status == 429 and headers[b"retry-after"] == b"1"
        health = asyncio.ensure_future(call("/health"))  # not counted, not refused
        await asyncio.sleep(0.05)
        assert not health.done() and limit.inflight == 2
        release.set()
        assert [s for s, _ in await asyncio.gather(*running, health)] == [200, 200, 200]
        assert limit.inflight == 0
        assert (await call("/v1/search"))[0] == 200

    asyncio.run(scenario())


def test_uvicorn_does_not_count_connections() -> None:
    from pipeline.api.server import uvicorn_options
    from pipeline.config import Settings

    options = uvicorn_options(Settings(http_max_connections=123, http_header_timeout=2.5))
    assert options["limit_concurrency"] is None
    assert options["http"].max_connections == 123 and options["http"].header_timeout == 2.5
