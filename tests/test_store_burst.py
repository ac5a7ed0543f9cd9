"""A frozen Milvus under a burst (issue 27, item 1): ``milvus-lite server`` SIGSTOPped while 120
concurrent /v1/search requests arrive on fresh connections over real HTTP. Every one is answered
503 or 429 (with Retry-After) within WINNOW_MILVUS_TIMEOUT + 1 s — past the store's threads the
excess is refused, and once the circuit breaker opens the rest fail fast — and after SIGCONT the
background probe closes the breaker and searches answer 200 again within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, MilvusServer, free_port

from testkit.corpus import ingest_corpus

TIMEOUT = 2.0  # WINNOW_MILVUS_TIMEOUT here
SLACK = 1.0  # the bound: timeout + 1 s
COOLDOWN = 1.0  # WINNOW_MILVUS_BREAKER_COOLDOWN
BURST = 120
INFLIGHT = 64
RECOVER_WITHIN = COOLDOWN + TIMEOUT + 5.0  # a probe's wait and its call, with slack for the host

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """Our own server: this test freezes it, which the session's shared one must never see."""
    srv = MilvusServer(tmp_path_factory.mktemp("milvus-burst"), free_port())
    srv.start()
    try:
        yield srv
    finally:
        thaw(srv)
        srv.kill()


def thaw(srv: MilvusServer) -> None:
    if srv.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.proc.pid, signal.SIGCONT)


async def burst(url: str, body: dict[str, Any], n: int) -> list[tuple[int, float, str | None]]:
    """``n`` searches at once, each on a fresh connection: (status, seconds, Retry-After)."""
    import httpx

    start = asyncio.Event()

    async def one() -> tuple[int, float, str | None]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await start.wait()
            t0 = time.monotonic()
            r = await client.post("/v1/search", json=body)
            return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(0.2)
    start.set()
    return await asyncio.gather(*tasks)


def summary(results: list[tuple[int, float, str | None]]) -> str:
    codes: dict[int, int] = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    times = sorted(t for _, t, _ in results)
    return (
        f"{dict(sorted(codes.items()))}; median {times[len(times) // 2]:.2f}s, max {times[-1]:.2f}s"
    )


def test_frozen_milvus_under_a_burst_keeps_every_deadline_then_recovers(
    server: MilvusServer, tmp_path: Path, embedder: Any
) -> None:
    import httpx

    from pipeline.api import create_app
    from pipeline.config import Settings

    settings = Settings(
        milvus_uri=server.uri,
        collection="burst",
        milvus_timeout=TIMEOUT,
        milvus_max_inflight=INFLIGHT,
        milvus_breaker_cooldown=COOLDOWN,
        rerank=False,
        embed_device="cpu",
    )
    ingest_corpus(settings, embedder, tmp_path)

    app = create_app(settings, embedder=embedder, reranker=None)
    body = {"query": "how do plants make sugar", "top_n": 3, "rerank": False}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        r = http.post("/v1/search", json=body)
        assert r.status_code == 200, r.text
        # the same burst with Milvus answering: what this host takes for the HTTP and embedding
        # work of BURST requests at once (a shared, loaded machine), measured in this run
        healthy = asyncio.run(burst(live.url, body, BURST))
        assert {c for c, _, _ in healthy} <= {200, 429}, summary(healthy)
        assert any(c == 200 for c, _, _ in healthy), summary(healthy)
        baseline = max(t for _, t, _ in healthy)

        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGSTOP)
        try:
            results = asyncio.run(burst(live.url, body, BURST))
            # the breaker is open now: a second wave is refused without waiting for Milvus
            second = asyncio.run(burst(live.url, body, 20))
            metrics = http.get("/metrics").text
        finally:
            thaw(server)
        thawed = time.monotonic()
        while True:
            r = http.post("/v1/search", json=body)
            if r.status_code == 200 or time.monotonic() - thawed > RECOVER_WITHIN:
                break
            time.sleep(0.1)
        recovered_s = time.monotonic() - thawed

    print(
        f"\nhealthy, {BURST} concurrent searches: {summary(healthy)}"
        f"\nSIGSTOP, {BURST} concurrent searches: {summary(results)} "
        f"(timeout {TIMEOUT:g}s); then 20 more: {summary(second)}; "
        f"200 again {recovered_s:.2f}s after SIGCONT"
    )
    assert all(code in (429, 503) for code, _, _ in results), summary(results)
    assert all(retry is not None and int(retry) >= 1 for _, _, retry in results)
    # timeout + 1 s beyond what the same burst costs this host with Milvus healthy (issue 27:
    # 34 of 100 waited >= 40 s, the longest 60 s, with a 10 s timeout)
    assert max(t for _, t, _ in results) <= TIMEOUT + SLACK + baseline, summary(results)
    assert all(code == 503 for code, _, _ in second), summary(second)
    assert max(t for _, t, _ in second) <= SLACK + baseline, summary(second)
    # open, or half-open when the 1 s cool-down ran out during the second wave (a probe's trial)
    state = re.search(r'winnow_breaker_state\{breaker="milvus"\} ([0-9.]+)', metrics)
    assert state is not None and float(state.group(1)) in (1.0, 2.0), metrics[-2000:]
    assert re.search(r'winnow_breaker_opened_total\{breaker="milvus"\} [1-9]', metrics)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["doc_id"] == "photosynthesis"


# --- the store itself: slots, a stuck thread, the breaker and its probe ------------------------

DIM = 8


@pytest.fixture(scope="module")
def store(server: MilvusServer) -> Iterator[Any]:
    import numpy as np

    from pipeline.domain import Passage
    from pipeline.store import MilvusStore

    s = MilvusStore(server.uri, "slots", timeout=TIMEOUT, max_inflight=4, breaker_cooldown=COOLDOWN)
    if s.exists():
        s.drop()
    s.ensure_collection(DIM, "m")
    s.upsert([Passage("a", 0, "fox", "Fox", {})], np.eye(DIM, dtype=np.float32)[:1])
    s.flush()
    yield s
    s.close()


def wait_closed(store: Any, within: float) -> float:
    t0 = time.monotonic()
    while store.breaker.state != "closed":
        assert time.monotonic() - t0 <= within, f"breaker still {store.breaker.state}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_calls_past_the_slots_are_refused_at_once_and_the_breaker_fails_fast(
    server: MilvusServer, store: Any
) -> None:
    """4 slots, 10 calls at once on a frozen Milvus: 6 refused (StoreBusy) without waiting, 4
    unavailable within the deadline; then the breaker is open and calls fail in microseconds;
    after SIGCONT the background probe closes it with no call of ours."""
    from pipeline.store import StoreBusy, StoreUnavailable

    vec = [1.0] + [0.0] * (DIM - 1)
    assert store.count() == 1

    async def ten() -> list[tuple[str, float]]:
        async def one() -> tuple[str, float]:
            t0 = time.monotonic()
            try:
                await store.arun(store.dense, vec, 1)
                outcome = "ok"
            except StoreBusy:
                outcome = "busy"
            except StoreUnavailable:
                outcome = "unavailable"
            return outcome, time.monotonic() - t0

        return await asyncio.gather(*(one() for _ in range(10)))

    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        results = asyncio.run(ten())
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.count()
        open_s = time.monotonic() - t0
        assert not isinstance(info.value, StoreBusy)
        assert store.breaker.state in ("open", "half_open") and not store.ping()
    finally:
        thaw(server)
    closed_s = wait_closed(store, RECOVER_WITHIN)
    print(f"\n10 calls, 4 slots, frozen: {sorted(results)}; open: {open_s * 1000:.1f} ms")
    print(f"breaker closed by the probe {closed_s:.2f}s after SIGCONT")
    busy = [t for o, t in results if o == "busy"]
    unavailable = [t for o, t in results if o == "unavailable"]
    assert len(busy) == 6 and len(unavailable) == 4, results
    assert max(busy) < 1.0  # refused, not queued behind the 4 stuck calls (generous)
    assert max(unavailable) <= TIMEOUT + SLACK
    assert open_s < 0.5
    assert store.count() == 1


def test_the_deadline_holds_while_pymilvus_holds_its_connection_lock(
    server: MilvusServer,
) -> None:
    """pymilvus' ``_recover`` reconnects under its process-wide ConnectionManager lock for its own
    connect timeout (15 s in issue 27), and every connect waits for that lock. Holding that very
    lock here, a new store's first call still ends within the deadline (its thread stays stuck
    until the lock is free)."""
    from pymilvus.client.connection_manager import ConnectionManager

    from pipeline.store import MilvusStore, StoreUnavailable

    fresh = MilvusStore(server.uri, "slots", timeout=TIMEOUT)
    lock = ConnectionManager.get_instance()._lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            fresh.count()
        took = time.monotonic() - t0
        assert fresh.stats()["milvus_inflight"] == 1  # its thread is still stuck, and counted
    finally:
        release.set()
        holder.join(10)
    print(f"\nfirst call with pymilvus' connection lock held: {took:.2f}s")
    assert took <= TIMEOUT + SLACK
    t0 = time.monotonic()
    while True:
        try:
            assert fresh.count() == 1
            break
        except StoreUnavailable:
            assert time.monotonic() - t0 < RECOVER_WITHIN
            time.sleep(0.1)
    fresh.close()
