"""Reranker scheduling benchmark (issue 11 item 6): slices vs head-of-line blocking, goodput under load.

Runs the real ``MicroBatcher`` in front of a real ``HFEngine`` over a tiny random Qwen3 reranker
(testkit/tiny_qwen.py, real Qwen tokenizer when ../shared/models has it), on CPU, in-process (no HTTP,
no Milvus: this measures the scheduler, not the web stack).

(a) A 2-document request is submitted while a 40-document request of ~8k-token documents runs:
    the short request's wait vs the long request's whole run, with slicing (default slice) and
    without (one slice = the whole request, the old behaviour).
(b) Goodput (successful requests/s) of closed-loop clients (each sends a 20-document request, and on
    429 waits Retry-After as a polite client does) with 8 and 64 clients and the default queue.

    .venv/bin/python bench/schedule.py --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed one

from pipeline.config import Settings
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.batcher import MicroBatcher, Overloaded, WorkTooLarge
from testkit.corpus import prose

WORDS = [
    "cell",
    "protein",
    "gene",
    "expression",
    "tumor",
    "patient",
    "study",
    "results",
    "model",
    "data",
    "analysis",
    "effect",
    "increase",
    "risk",
    "treatment",
    "response",
    "mechanism",
    "signal",
    "pathway",
    "receptor",
    "clinical",
    "trial",
    "dose",
]


def text(rng: random.Random, chars: int) -> str:
    return prose(rng, chars, WORDS)


def make_batcher(engine: Any, settings: Settings, **over: Any) -> MicroBatcher:
    b = MicroBatcher.from_settings(engine, settings.reranker, **over)
    b.calibrate()
    return b


async def head_of_line(batcher: MicroBatcher, long_docs: list[str], short_docs: list[str]) -> dict:
    t0 = time.perf_counter()
    long_task = asyncio.ensure_future(batcher.submit(RerankRequest("long query", long_docs)))
    while batcher.stats.dispatches == 0 and batcher.inflight_seconds == 0:
        await asyncio.sleep(0.005)  # wait until the long request is in the engine
    await asyncio.sleep(0.05)
    s0 = time.perf_counter()
    dispatches_before = batcher.stats.dispatches
    await batcher.submit(RerankRequest("short query", short_docs))
    short_wait = time.perf_counter() - s0
    long_slices_meanwhile = batcher.stats.dispatches - dispatches_before
    await long_task
    return {
        "slice_tokens": batcher.slice_tokens,
        "long_total_s": round(time.perf_counter() - t0, 3),
        "short_wait_s": round(short_wait, 3),
        "dispatches_until_short_done": long_slices_meanwhile,
        "long_dispatches": batcher.stats.dispatches,
        "tokens_per_s_estimated": round(batcher.tokens_per_s),
    }


async def goodput(batcher: MicroBatcher, clients: int, seconds: float, docs: list[str]) -> dict:
    ok_lat: list[float] = []
    refused = too_large = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal refused, too_large
        n = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                await batcher.submit(RerankRequest(f"query {i} {n}", docs))
                if time.perf_counter() <= stop:
                    ok_lat.append(time.perf_counter() - t)
            except Overloaded as exc:
                refused += 1
                await asyncio.sleep(min(exc.retry_after, max(0.0, stop - time.perf_counter())))
            except WorkTooLarge:
                too_large += 1
                return
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(ok_lat)
    return {
        "clients": clients,
        "ok": len(lat),
        "goodput_rps": round(len(lat) / seconds, 3),
        "refused_429": refused,
        "too_large_413": too_large,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "wall_s": round(wall, 2),
        "merged_dispatches": batcher.stats.merged_dispatches,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each goodput run")
    ap.add_argument("--long-docs", type=int, default=40)
    ap.add_argument("--long-chars", type=int, default=40_000, help="~8k tokens after the cut")
    ap.add_argument("--docs", type=int, default=20, help="documents per goodput request")
    ap.add_argument("--doc-chars", type=int, default=1200)
    ap.add_argument("--clients", default="8,64")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from pipeline.rerank.backends.hf.engine import HFEngine
    from testkit.tiny_qwen import build_tiny_reranker, real_tokenizer_available

    settings = Settings()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_reranker(Path(tmp) / "tiny")
        engine = HFEngine(str(path), device="cpu", dtype="float32")
        engine.load()
    results: dict[str, Any] = {
        "model": "tiny Qwen3 (2 layers, hidden 64), random weights, fp32, CPU",
        "tokenizer": "real Qwen3" if real_tokenizer_available() else "tiny BPE",
        "settings": {
            "queue_size": settings.rerank_queue_size,
            "queue_tokens": settings.rerank_queue_tokens,
            "deadline_s": settings.rerank_deadline_s,
            "slice_tokens": settings.rerank_slice_tokens,
        },
    }
    long_docs = [text(rng, args.long_chars) for _ in range(args.long_docs)]
    short_docs = [text(rng, 600) for _ in range(2)]
    for name, over in [("sliced", {}), ("unsliced", {"slice_tokens": 10**9})]:
        # deadline off here: (a) measures ordering; (b) runs with the default deadline
        b = make_batcher(engine, settings, deadline_s=None, **over)
        results[f"a_{name}"] = asyncio.run(head_of_line(b, long_docs, short_docs))
        print(f"a_{name}", json.dumps(results[f"a_{name}"]), flush=True)
        asyncio.run(b.aclose())
    docs = [text(rng, args.doc_chars) for _ in range(args.docs)]
    for c in [int(x) for x in args.clients.split(",")]:
        b = make_batcher(engine, settings)
        results[f"b_c{c}"] = asyncio.run(goodput(b, c, args.seconds, docs))
        print(f"b_c{c}", json.dumps(results[f"b_c{c}"]), flush=True)
        asyncio.run(b.aclose())
    cs = [int(x) for x in args.clients.split(",")]
    lo, hi = results[f"b_c{min(cs)}"]["goodput_rps"], results[f"b_c{max(cs)}"]["goodput_rps"]
    results["goodput_ratio"] = round(hi / lo, 3) if lo else None
    print("goodput ratio", results["goodput_ratio"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
