"""The reranker's cost model on a real architecture: start-up profile cost, predicted vs measured
time per pair length, and how many of a default search's candidates fit its budget.

    python bench/admission.py [--arch qwen3-0.6b] [--lengths 128,512,2048] [--candidates 50]

Builds (once, cached under /tmp) the random-weight Qwen3-Reranker-0.6B-shaped checkpoint of
bench/rerank.py, loads the hf engine as the server does, times ``MicroBatcher.calibrate()`` (the
start-up profile), then scores one request per length (``--pairs`` pairs of about that many engine
tokens) and prints the model's prediction beside the measured seconds (each row then teaches the
model, as a dispatch does); last, how many of
``--candidates`` SciFact-sized passages (~``--passage-tokens``) a ``/v1/search`` would rerank within
``--budget-s`` on an idle queue. A benchmark, never a test: the host may be shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank import ARCHS, build_model_dir  # noqa: E402

from pipeline.rerank.backends.hf.engine import HFEngine  # noqa: E402
from pipeline.rerank.base import RerankRequest  # noqa: E402
from pipeline.rerank.batcher import CALIBRATION_TEXT, CHARS_PER_TOKEN, MicroBatcher  # noqa: E402


def doc_of(engine_tokens: float, scale: float) -> str:
    chars = int(engine_tokens / scale * CHARS_PER_TOKEN)
    text = (CALIBRATION_TEXT + " ") * (1 + chars // (len(CALIBRATION_TEXT) + 1))
    return text[:chars]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--passage-tokens", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    path = build_model_dir(Path(f"/tmp/winnow-bench-{args.arch}"), args.arch)
    engine = HFEngine(str(path), device="cpu", dtype=args.dtype)
    t0 = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - t0
    batcher = MicroBatcher(engine, deadline_s=args.budget_s)
    t0 = time.perf_counter()
    batcher.calibrate()
    profile_s = time.perf_counter() - t0
    out: dict = {
        "arch": args.arch,
        "dtype": engine.dtype,
        "load_s": round(load_s, 2),
        "profile_s": round(profile_s, 2),
        "profile_points": [(round(n), round(s * n, 4)) for n, s in batcher.cost.profile],
        "token_scale": round(batcher.token_scale, 3),
        "line": batcher.cost.line,
        "rows": [],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        req = RerankRequest(
            "what do the documents say?", [doc_of(n, batcher.token_scale)] * args.pairs
        )
        _, lens = batcher.work(req)
        predicted = batcher.cost.seconds(lens)
        t0 = time.perf_counter()
        engine.score_requests([req])
        measured = time.perf_counter() - t0
        batcher.cost.observe(
            lens, measured
        )  # as a dispatch would: the next rows use what it learnt
        row = {
            "engine_tokens": round(lens[0]),
            "pairs": args.pairs,
            "predicted_s": round(predicted, 2),
            "measured_s": round(measured, 2),
            "ratio": round(measured / predicted, 2),
        }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["line_after"] = batcher.cost.line
    passage = doc_of(args.passage_tokens, batcher.token_scale)
    search = RerankRequest("a scientific claim", [passage] * args.candidates)
    fit = batcher.affordable(search, args.budget_s)
    out["search"] = {
        "candidates": args.candidates,
        "passage_engine_tokens": round(batcher.work(search)[1][0]),
        "budget_s": args.budget_s,
        "reranked": fit,
        "predicted_s": round(batcher.cost.seconds(batcher.work(search)[1][:fit]), 1),
    }
    print(json.dumps(out["search"]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
