"""Query-path benchmark: per-stage p50/p95 over real HTTP on SciFact, 1 vs N concurrent clients.

Runs the real app (uvicorn on loopback) over a Milvus Lite file that already holds SciFact
(``python -m ingest ../shared/data/scifact/corpus.jsonl --milvus-uri DB``), sends SciFact queries
from C concurrent clients, and reports, per run: QPS, client latency p50/p95, the server's stage
timings (embed, recall, rerank, total) p50/p95 and the overhead total − (embed + recall + rerank).

The reranker is either a local checkpoint (``--reranker DIR``), the real Qwen3-Reranker-0.6B
architecture with random weights (``--reranker qwen3-0.6b-random``; same compute as the real model),
or the tiny 2-layer test model (``--reranker tiny``). ``--no-batching`` dispatches one request per
forward call (the baseline for the cross-request batching ratio).

    python bench/query.py --db data/scifact.db --reranker qwen3-0.6b-random --top-k 10 \
        --queries 24 --concurrency 1,8

``--remote-hop`` measures instead what the remote backend adds: the same query and 20 SciFact
documents scored by the local backend (in process) and by the remote backend pointed at a local
Winnow (another process) serving that same backend on loopback, interleaved; it reports both
latencies and the paired difference (p50/p95), once with an engine that answers instantly (the hop
alone) and once with the model (use the tiny one so model time does not drown the hop):

    python bench/query.py --remote-hop --reranker tiny --hop-docs 20 --hop-iters 300

``--hop-clients`` sends that same 20-document /v1/rerank POST to the instant-engine Winnow with each
HTTP client in turn (a hand-written HTTP/1.1 exchange on a raw socket as the floor, httpx, httpcore,
aiohttp), interleaved on one uvloop, and reports each client's p50/p95 and its p50 over the floor:
the measurement behind the remote backend's choice of client.

    python bench/query.py --hop-clients --reranker tiny --hop-iters 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline.rerank.base import EngineStats, RerankEngine  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def load_queries(n: int) -> list[str]:
    out = []
    with (SCIFACT / "queries.jsonl").open() as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def reranker_dir(spec: str) -> str:
    if spec == "tiny":
        from testkit.tiny_qwen import build_tiny_reranker

        return str(build_tiny_reranker(Path("/tmp/winnow-bench-tiny-qwen3")))
    if spec == "qwen3-0.6b-random":
        from rerank import build_model_dir

        return str(build_model_dir(Path("/tmp/winnow-bench-qwen3-reranker-0.6b")))
    return spec


async def run_clients(url: str, queries: list[str], concurrency: int, body: dict[str, Any]):
    todo = list(queries)
    records: list[dict[str, Any]] = []

    async def client(c: httpx.AsyncClient) -> None:
        while todo:
            q = todo.pop()
            t0 = time.perf_counter()
            r = await c.post("/v1/search", json={"query": q, **body})
            r.raise_for_status()
            rec = r.json()["timings_ms"]
            rec["client"] = (time.perf_counter() - t0) * 1000
            records.append(rec)

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return records, wall


def summarize(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    out: dict[str, Any] = {"queries": len(records), "wall_s": round(wall, 2)}
    out["qps"] = round(len(records) / wall, 3)
    for key in ("embed", "recall", "rerank", "total", "client"):
        vals = [r[key] for r in records]
        out[f"{key}_p50"] = round(pct(vals, 0.5), 2)
        out[f"{key}_p95"] = round(pct(vals, 0.95), 2)
    over = [r["total"] - r["embed"] - r["recall"] - r["rerank"] for r in records]
    out["overhead_p50"] = round(pct(over, 0.5), 3)
    out["http_overhead_p50"] = round(pct([r["client"] - r["total"] for r in records], 0.5), 2)
    return out


def load_docs(n: int) -> list[str]:
    out = []
    with (SCIFACT / "corpus.jsonl").open() as fh:
        for line in fh:
            rec = json.loads(line)
            out.append(f"{rec.get('title', '')}\n{rec['text']}".strip())
            if len(out) >= n:
                break
    return out


class NullEngine(RerankEngine):
    """Answers instantly: what is left of a remote call is the hop itself (HTTP, JSON, the route)."""

    backend = "null"
    dtype = device = "none"

    def __init__(self) -> None:
        self.counters = EngineStats()

    def load(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return self.counters

    def score_requests(self, requests: Any) -> list[list[float]]:
        return [[0.5] * len(r.docs) for r in requests]


def make_engine(kind: str, model: str, dtype: str) -> Any:
    if kind == "null":
        return NullEngine()
    from pipeline.rerank.backends.hf.engine import HFEngine

    engine = HFEngine(model, dtype=dtype)
    engine.load()
    return engine


def serve_remote(port: int, kind: str, model: str, dtype: str, max_wait_ms: float, db: str) -> None:
    """The remote Winnow, in its own process (as a remote is): /v1/rerank over ``kind``."""
    import uvicorn

    from pipeline.api import create_app
    from pipeline.config import Settings
    from pipeline.logs import setup_logging
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher

    setup_logging("WARNING")
    engine = make_engine(kind, model, dtype)
    batcher = MicroBatcher(engine, max_wait_ms=max_wait_ms, queue_size=1024)
    settings = Settings(milvus_uri=db, rerank_model=model, embed_device="cpu")
    app = create_app(settings, reranker=BatchedReranker(engine, "bench", batcher))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def measure_hop(
    local: Any, remote: Any, queries: list[str], docs: list[str], iters: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Milliseconds per call, local then remote on the same inputs, interleaved."""
    loc: list[float] = []
    rem: list[float] = []
    try:
        for i in range(warmup + iters):
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            a = await local.score(q, docs)
            t1 = time.perf_counter()
            b = await remote.score(q, docs)
            t2 = time.perf_counter()
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
            if i >= warmup:
                loc.append((t1 - t0) * 1000)
                rem.append((t2 - t1) * 1000)
    finally:
        await remote.aclose()
        await local.aclose()
    return loc, rem


def run_like_uvicorn(coro: Any) -> Any:
    """On uvloop when it is installed, as uvicorn's ``loop="auto"`` runs the API that makes the hop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def remote_hop(args: argparse.Namespace) -> dict[str, Any]:
    """Local backend vs remote backend → a local Winnow in another process (loopback), same
    inputs, interleaved; once with an instant engine (the hop alone) and once with the model."""
    import multiprocessing
    import tempfile

    from pipeline.rerank.backends.remote.reranker import RemoteReranker
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher
    from testkit.servers import free_port, wait_port

    model = reranker_dir(args.reranker)
    docs = load_docs(args.hop_docs)
    queries = load_queries(max(args.queries, 8))
    out: dict[str, Any] = {"reranker": args.reranker, "documents": len(docs), "runs": {}}
    for kind, iters in (("null", args.hop_iters), ("model", args.hop_model_iters)):
        if iters <= 0:
            continue
        port = free_port()
        db = str(Path(tempfile.mkdtemp()) / "hop.db")
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=serve_remote, args=(port, kind, model, args.dtype, args.max_wait_ms, db)
        )
        proc.start()
        try:
            wait_port(port, timeout=300)
            engine = make_engine(kind, model, args.dtype)
            batcher = MicroBatcher(engine, max_wait_ms=args.max_wait_ms, queue_size=1024)
            local = BatchedReranker(engine, "bench", batcher)
            remote = RemoteReranker(f"http://127.0.0.1:{port}/v1/rerank", model="bench")

            loc, rem = run_like_uvicorn(
                measure_hop(local, remote, queries, docs, iters, args.hop_warmup)
            )
        finally:
            proc.terminate()
            proc.join(30)
        added = [r - lo for r, lo in zip(rem, loc, strict=True)]
        run = {
            "engine": kind if kind == "null" else f"{args.reranker} ({engine.dtype})",
            "iterations": len(loc),
            "local_p50_ms": round(pct(loc, 0.5), 3),
            "local_p95_ms": round(pct(loc, 0.95), 3),
            "remote_p50_ms": round(pct(rem, 0.5), 3),
            "remote_p95_ms": round(pct(rem, 0.95), 3),
            "added_p50_ms": round(pct(added, 0.5), 3),
            "added_p95_ms": round(pct(added, 0.95), 3),
            "remote_calls": remote.stats()["remote_calls"],
            "remote_retries": remote.stats()["remote_retries"],
        }
        out["runs"][kind] = run
        print(kind, json.dumps(run), flush=True)
    return out


async def measure_clients(
    url: str, body: bytes, n_docs: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per POST for each client, the clients taking turns on every iteration."""
    from urllib.parse import urlsplit

    import aiohttp
    import httpcore
    import orjson

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    json_headers = {"content-type": "application/json"}

    async def raw() -> bytes:
        writer.write(head + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        length = next(
            int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length")
        )
        return await reader.readexactly(length)

    async with (
        httpx.AsyncClient(timeout=300) as hx,
        httpcore.AsyncConnectionPool() as hc,
        aiohttp.ClientSession() as ah,
    ):

        async def with_httpx() -> bytes:
            return (await hx.post(url, content=body, headers=json_headers)).content

        async def with_httpcore() -> bytes:
            return (await hc.request("POST", url, content=body, headers=json_headers)).content

        async def with_aiohttp() -> bytes:
            async with ah.post(url, data=body, headers=json_headers) as resp:
                return await resp.read()

        clients = {
            "raw socket": raw,
            "httpx": with_httpx,
            "httpcore": with_httpcore,
            "aiohttp": with_aiohttp,
        }
        times: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(warmup + iters):
            for name, call in clients.items():
                t0 = time.perf_counter()
                answer = orjson.loads(await call())
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1000)
                assert len(answer["results"]) == n_docs, answer
    writer.close()
    return times


def hop_clients(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing
    import tempfile

    import orjson

    from pipeline.rerank.prompt import DEFAULT_INSTRUCTION
    from testkit.servers import free_port, wait_port

    docs = load_docs(args.hop_docs)
    query = load_queries(1)[0]
    body = orjson.dumps({"query": query, "documents": docs, "instruction": DEFAULT_INSTRUCTION})
    port = free_port()
    db = str(Path(tempfile.mkdtemp()) / "hop.db")
    model = reranker_dir(args.reranker)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=serve_remote, args=(port, "null", model, "auto", 0.0, db))
    proc.start()
    try:
        wait_port(port, timeout=300)
        url = f"http://127.0.0.1:{port}/v1/rerank"
        times = run_like_uvicorn(
            measure_clients(url, body, len(docs), args.hop_iters, args.hop_warmup)
        )
    finally:
        proc.terminate()
        proc.join(30)
    floor = pct(times["raw socket"], 0.5)
    out: dict[str, Any] = {"documents": len(docs), "body_bytes": len(body), "clients": {}}
    for name, ms in times.items():
        p50 = pct(ms, 0.5)
        out["clients"][name] = {
            "p50_ms": round(p50, 3),
            "p95_ms": round(pct(ms, 0.95), 3),
            "over_raw_p50_ms": round(p50 - floor, 3),
        }
        print(name, json.dumps(out["clients"][name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", help="Milvus Lite file (or server URI) holding SciFact")
    ap.add_argument("--collection", default="winnow")
    ap.add_argument("--reranker", default="qwen3-0.6b-random")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--top-n", type=int, default=10)
    ap.add_argument("--no-hybrid", action="store_true")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--no-batching", action="store_true", help="one request per engine call")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--remote-hop", action="store_true", help="measure the remote backend's hop")
    ap.add_argument("--hop-clients", action="store_true", help="compare HTTP clients on the hop")
    ap.add_argument("--hop-docs", type=int, default=20)
    ap.add_argument("--hop-iters", type=int, default=300, help="with the instant engine")
    ap.add_argument("--hop-model-iters", type=int, default=60, help="with the model")
    ap.add_argument("--hop-warmup", type=int, default=20)
    args = ap.parse_args(argv)
    if args.remote_hop or args.hop_clients:
        out = remote_hop(args) if args.remote_hop else hop_clients(args)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    if args.db is None:
        ap.error("--db is required (except with --remote-hop and --hop-clients)")

    from pipeline.api import create_app
    from pipeline.config import Settings
    from pipeline.logs import setup_logging
    from pipeline.rerank.backends.hf.engine import HFEngine
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher
    from testkit.servers import LiveServer

    setup_logging("WARNING")
    settings = Settings(
        milvus_uri=args.db,
        collection=args.collection,
        rerank_model=reranker_dir(args.reranker),
        rerank_dtype=args.dtype,
        rerank_max_wait_ms=args.max_wait_ms,
        hybrid=not args.no_hybrid,
    )
    engine = HFEngine(settings.rerank_model, dtype=settings.rerank_dtype)
    engine.load()
    queries = load_queries(args.queries)
    body = {"top_k": args.top_k, "top_n": args.top_n}
    results: dict[str, Any] = {
        "reranker": args.reranker,
        "dtype": str(engine.dtype),
        "device": str(engine.device),
        "top_k": args.top_k,
        "hybrid": not args.no_hybrid,
        "runs": {},
    }
    for batching in [False] if args.no_batching else [True, False]:
        batcher = MicroBatcher(
            engine,
            max_wait_ms=args.max_wait_ms,
            queue_size=1024,
            max_requests_per_dispatch=None if batching else 1,
        )
        app = create_app(settings, reranker=BatchedReranker(engine, "bench", batcher))
        with LiveServer(app) as server:
            asyncio.run(run_clients(server.url, queries[:2], 1, body))  # warm-up
            for c in [int(x) for x in args.concurrency.split(",")]:
                recs, wall = asyncio.run(run_clients(server.url, queries, c, body))
                key = f"c{c}_{'batched' if batching else 'unbatched'}"
                results["runs"][key] = summarize(recs, wall) | {
                    "merged_dispatches": batcher.stats.merged_dispatches,
                    "max_requests_per_dispatch": batcher.stats.max_requests_per_dispatch,
                }
                print(key, json.dumps(results["runs"][key]), flush=True)
    runs = results["runs"]
    cmax = max(int(x) for x in args.concurrency.split(","))
    if f"c{cmax}_batched" in runs and f"c{cmax}_unbatched" in runs:
        results["qps_ratio_batched_vs_unbatched"] = round(
            runs[f"c{cmax}_batched"]["qps"] / runs[f"c{cmax}_unbatched"]["qps"], 3
        )
    if f"c{cmax}_batched" in runs and "c1_batched" in runs:
        results["qps_ratio_cN_vs_c1"] = round(
            runs[f"c{cmax}_batched"]["qps"] / runs["c1_batched"]["qps"], 3
        )
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
