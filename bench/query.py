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
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

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
        from tiny_qwen import build_tiny_reranker

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", required=True, help="Milvus Lite file (or server URI) holding SciFact")
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
    args = ap.parse_args(argv)

    from conftest import LiveServer

    from pipeline.api import create_app
    from pipeline.config import Settings
    from pipeline.logs import setup_logging
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher
    from pipeline.rerank.hf import HFEngine

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
