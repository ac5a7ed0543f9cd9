"""Benchmark: the score cache on a repeated-FAQ workload (SciFact queries asked twice).

The reranker is built from Settings exactly as ``serve`` builds it (``build_reranker``: backend, batcher,
then the cache), over the Qwen3-Reranker-0.6B architecture with random weights (``--arch``, as in
bench/rerank.py) or the tests' tiny model. Workload: ``--queries`` SciFact train queries, each with
its 20 candidates (bench/rerank.py's lists), asked once in turn and then again in another order, as
users of a fixed FAQ set do. Reported per pass: latency p50/p95/max of a request and the cache's hit
rate; with ``--cache-mb 0`` the same workload without the cache (both passes pay the engine).

    .venv/bin/python bench/cache.py --queries 4 --json bench/results/cache.json
    .venv/bin/python bench/cache.py --queries 4 --cache-mb 0

Never run as a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank import ARCHS, build_model_dir, emit, header, load_scifact  # noqa: E402

from pipeline.config import Settings  # noqa: E402
from pipeline.rerank.factory import build_reranker  # noqa: E402


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--docs-per-query", type=int, default=20)
    ap.add_argument("--cache-mb", type=int, default=64)
    ap.add_argument("--arch", default="qwen3-0.6b", choices=[*ARCHS, "tiny"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.arch == "tiny":
        from testkit.tiny_qwen import build_tiny_reranker

        path = str(build_tiny_reranker(Path("/tmp/winnow-bench-tiny-qwen3")))
    else:
        path = str(build_model_dir(Path(f"/tmp/winnow-bench-{args.arch}"), args.arch))
    settings = Settings(
        rerank_model=path,
        rerank_backend="hf",
        rerank_device="cpu",
        rerank_dtype=args.dtype,
        rerank_cache_mb=args.cache_mb,
        rerank_deadline_s=0,
    )
    reranker = build_reranker(settings.reranker)
    reranker.load()
    reqs = load_scifact(args.queries, args.docs_per_query)
    again = list(reqs)
    random.Random(1).shuffle(again)

    async def workload() -> list[dict[str, Any]]:
        passes = []
        try:
            for name, batch in (("first ask", reqs), ("asked again", again)):
                before = reranker.stats()
                seconds = []
                for r in batch:
                    t0 = time.perf_counter()
                    await reranker.score(r.query, r.docs, settings.rerank_instruction)
                    seconds.append(time.perf_counter() - t0)
                after = reranker.stats()
                hits = after.get("rerank_cache_hits", 0) - before.get("rerank_cache_hits", 0)
                pairs = sum(len(r.docs) for r in batch)
                passes.append(
                    {
                        "pass": name,
                        "requests": len(batch),
                        "p50_ms": round(percentile(seconds, 0.5) * 1000, 3),
                        "p95_ms": round(percentile(seconds, 0.95) * 1000, 3),
                        "max_ms": round(max(seconds) * 1000, 3),
                        "mean_ms": round(statistics.fmean(seconds) * 1000, 3),
                        "hit_rate": round(hits / pairs, 3),
                        "pairs_scored_by_engine": int(
                            after["rerank_pairs"] - before.get("rerank_pairs", 0)
                        ),
                    }
                )
                print(json.dumps(passes[-1]), file=sys.stderr, flush=True)
        finally:
            await reranker.aclose()
        return passes

    passes = asyncio.run(workload())
    stats = reranker.stats()
    return emit(
        {
            **header("bench/cache.py", argv),
            "arch": args.arch,
            "cache_mb": args.cache_mb,
            "passes": passes,
            "cache": {k: v for k, v in stats.items() if k.startswith("rerank_cache")},
        },
        args.json,
    )


if __name__ == "__main__":
    raise SystemExit(main())
