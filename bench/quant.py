"""Benchmark: the int8 mode (WINNOW_RERANK_QUANT=int8, pipeline/rerank/backends/hf/quant.py) against fp32, one run.

Parts (``--parts``, default all):

- ``rerank``: the real Qwen3-Reranker-0.6B architecture with random weights (bench/rerank.py's
  ``build_model_dir``; no weights can be downloaded here) on SciFact requests (``load_scifact``:
  train queries, qrel documents + lexical neighbours). The hf engine in fp32 and in int8, same
  requests, interleaved per request. Fidelity: per-pair |Δscore| (max, mean), Kendall τ and top-10
  overlap per request. Speed: per-request latency (median over the requests; each request is scored
  by both engines back to back, so the per-request ratio's median is the least noisy figure).
- ``minilm``: the same int8 path (``quantize_linears``) on the shipped, *trained* all-MiniLM-L6-v2
  (random weights lack the activation outliers of trained models): nDCG@10 of dense retrieval on
  SciFact (train qrels, first ``--minilm-queries`` judged queries; the corpus is their relevant
  documents plus ``--minilm-docs`` others drawn at random, so a subset) fp32 vs int8, with
  ``evaluation.report.measure``.
- ``linears``: the reranker's seven linear shapes at 512 rows, per forward: torch fp32, oneDNN fp32
  (the engine's ``cpu_gemm=onednn``), torch's ``quantize_dynamic`` (per-tensor activations), torchao's
  int8 dynamic mode when importable, and Winnow's int8 (per-token): why this module was chosen.

    .venv/bin/python bench/quant.py --queries 5 --docs 20 --json out.json
    .venv/bin/python bench/quant.py --parts linears,minilm
    .venv/bin/python bench/quant.py --parts rerank --queries 2 --threads 1   # a host shared with others
    .venv/bin/python bench/quant.py --parts rerank --queries 1 --repeat 5    # one request, 5 times

On a host whose cores other processes also use, every parallel op of a 2-thread torch waits for the
descheduled thread (measured here: ~8 ms per elementwise op instead of 0.2 ms), which punishes the
path with more ops (int8: quantize + dequantize around each GEMM); ``--threads 1`` measures the
compute without that wait.

Never run as a test.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank import SCIFACT, build_model_dir, emit, header, load_scifact  # noqa: E402

from pipeline.rerank.backends.hf.engine import HFEngine  # noqa: E402

PARTS = ("rerank", "minilm", "linears")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall τ-b (ties handled as scipy does)."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def top_overlap(a: Sequence[float], b: Sequence[float], k: int = 10) -> float:
    """Share of the top ``k`` by ``a`` that are also in the top ``k`` by ``b``."""
    k = min(k, len(a))
    top = lambda s: set(sorted(range(len(s)), key=lambda i: -s[i])[:k])  # noqa: E731
    return len(top(a) & top(b)) / k


# --- the reranker --------------------------------------------------------------------------------
def bench_rerank(args: argparse.Namespace) -> dict[str, Any]:
    path = str(build_model_dir(Path(f"/tmp/winnow-bench-{args.arch}"), args.arch))
    reqs = load_scifact(args.queries, args.docs, seed=args.seed) * args.repeat
    engines = {
        "fp32": HFEngine(path, device="cpu", dtype="float32", cpu_gemm=args.cpu_gemm),
        "int8": HFEngine(path, device="cpu", dtype="float32", quant="int8"),
    }
    if args.bf16:
        engines["bf16"] = HFEngine(path, device="cpu", dtype="bfloat16")
    load_s = {}
    for name, e in engines.items():
        t0 = time.perf_counter()
        e.load()
        load_s[name] = round(time.perf_counter() - t0, 2)
        e.score(reqs[0].query, reqs[0].docs[:2])  # warm-up: oneDNN primitives
    times: dict[str, list[float]] = {n: [] for n in engines}
    scores: dict[str, list[list[float]]] = {n: [] for n in engines}
    for i, r in enumerate(reqs):
        for name, e in engines.items():
            t0 = time.perf_counter()
            scores[name].append(e.score(r.query, r.docs))
            times[name].append(time.perf_counter() - t0)
        line = " ".join(f"{n}={times[n][-1]:.2f}s" for n in engines)
        print(f"  request {i + 1}/{len(reqs)}: {line}", file=sys.stderr, flush=True)
    deltas = [
        abs(a - b)
        for f, q in zip(scores["fp32"], scores["int8"], strict=True)
        for a, b in zip(f, q, strict=True)
    ]
    taus = [kendall_tau(f, q) for f, q in zip(scores["fp32"], scores["int8"], strict=True)]
    overlaps = [top_overlap(f, q) for f, q in zip(scores["fp32"], scores["int8"], strict=True)]
    spread = [statistics.pstdev(f) for f in scores["fp32"]]
    ratio = [f / q for f, q in zip(times["fp32"], times["int8"], strict=True)]
    speed = {f"{n}_median_ms": round(1e3 * statistics.median(times[n]), 1) for n in engines} | {
        "int8_speedup_median_of_per_request_ratios": round(statistics.median(ratio), 2),
        "int8_speedup_per_request": [round(x, 2) for x in ratio],
    }
    if args.bf16:
        speed["bf16_over_int8_median"] = round(
            statistics.median(b / q for b, q in zip(times["bf16"], times["int8"], strict=True)),
            2,
        )
    return {
        "arch": args.arch,
        "requests": len(reqs),
        "docs_per_request": args.docs,
        "fp32_cpu_gemm": engines["fp32"].cpu_gemm,
        "load_s": load_s,
        "fidelity": {
            "pairs": len(deltas),
            "abs_delta_max": round(max(deltas), 5),
            "abs_delta_mean": round(statistics.fmean(deltas), 5),
            "fp32_score_std_per_request_mean": round(statistics.fmean(spread), 5),
            "kendall_tau_mean": round(statistics.fmean(taus), 3),
            "kendall_tau_min": round(min(taus), 3),
            "top10_overlap_mean": round(statistics.fmean(overlaps), 3),
            "top10_overlap_min": round(min(overlaps), 3),
        },
        "speed": speed,
    }


# --- a trained model: MiniLM dense retrieval -------------------------------------------------------
def bench_minilm(args: argparse.Namespace) -> dict[str, Any]:
    import json

    import torch

    from evaluation.data import load_dataset
    from evaluation.report import measure
    from pipeline.config import DEFAULT_EMBED_MODEL
    from pipeline.embedding import Embedder
    from pipeline.rerank.backends.hf.quant import quantize_linears

    data = load_dataset(SCIFACT, split="train", max_queries=args.minilm_queries)
    relevant = {d for q in data.qrels.values() for d in q}
    corpus: dict[str, str] = {}
    with open(data.corpus, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d.get("text", "")).strip()
    others = sorted(set(corpus) - relevant)
    random.Random(args.seed).shuffle(others)
    ids = sorted(relevant & set(corpus)) + others[: args.minilm_docs]
    qids = list(data.queries)
    texts = [corpus[d] for d in ids]
    queries = [data.queries[q] for q in qids]

    st = Embedder(DEFAULT_EMBED_MODEL, device="cpu").load().encoder
    out: dict[str, Any] = {
        "queries": len(qids),
        "corpus_docs": len(ids),
        "note": "SciFact train qrels; corpus = relevant docs + random others (a subset)",
    }
    embs = {}
    for name in ("fp32", "int8"):
        if name == "int8":
            st = copy.deepcopy(st)
            out["int8_linears"] = quantize_linears(st[0].auto_model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            doc_e = st.encode(
                texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True
            )
            q_e = st.encode(
                queries, batch_size=64, convert_to_tensor=True, normalize_embeddings=True
            )
        out[f"{name}_encode_s"] = round(time.perf_counter() - t0, 1)
        embs[name] = (doc_e, q_e)
        sims = q_e @ doc_e.T
        top = sims.topk(100, dim=1)
        runs = {
            qid: [(ids[j], float(s)) for s, j in zip(top.values[i], top.indices[i], strict=True)]
            for i, qid in enumerate(qids)
        }
        out[name] = {k: round(v, 4) for k, v in measure(data.qrels, runs, name).items()}
        print(f"  minilm {name}: {out[name]}", file=sys.stderr, flush=True)
    cos = (embs["fp32"][0] * embs["int8"][0]).sum(1)
    out["doc_embedding_cosine_fp32_vs_int8"] = {
        "min": round(float(cos.min()), 5),
        "mean": round(float(cos.mean()), 5),
    }
    return out


# --- the linear layers ------------------------------------------------------------------------------
SHAPES = [(1024, 2048), (1024, 1024), (1024, 1024), (2048, 1024), (1024, 3072), (1024, 3072),
          (3072, 1024)]  # fmt: skip


def bench_linears(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.rerank.backends.hf.linear import onednn_linear
    from pipeline.rerank.backends.hf.quant import int8_linear

    torch.manual_seed(0)
    rows = 512
    totals: dict[str, float] = {}
    errors: dict[str, float] = {}
    skipped: dict[str, str] = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, n in SHAPES:
            dense = torch.nn.Linear(k, n, bias=False).eval()
            x = torch.randn(rows, k)
            fns: dict[str, Any] = {"fp32-torch": dense, "fp32-onednn": onednn_linear(dense)}
            try:
                fns["int8-torch.ao-dynamic"] = torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(dense), {torch.nn.Linear}, dtype=torch.qint8
                )
            except (AttributeError, RuntimeError) as exc:
                skipped["int8-torch.ao-dynamic"] = repr(exc)[:120]
            try:
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

                tao = torch.nn.Sequential(copy.deepcopy(dense))
                quantize_(tao, Int8DynamicActivationInt8WeightConfig())
                fns["int8-torchao"] = tao
            except ImportError as exc:
                skipped["int8-torchao"] = repr(exc)[:120]
            fns["int8-winnow"] = int8_linear(dense)
            want = dense(x)
            for f in fns.values():
                f(x)
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.reps):
                for name, f in fns.items():  # interleaved: host noise hits all alike
                    t0 = time.perf_counter()
                    f(x)
                    samples[name].append(time.perf_counter() - t0)
            for name, f in fns.items():
                totals[name] = totals.get(name, 0.0) + statistics.median(samples[name])
                rel = float((f(x) - want).abs().max() / want.abs().max())
                errors[name] = max(errors.get(name, 0.0), rel)
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "engine": torch.backends.quantized.engine,
        "ms_per_forward_7_linears": {k: round(1e3 * v, 1) for k, v in totals.items()},
        "speedup_vs_fp32_torch": {k: round(totals["fp32-torch"] / v, 2) for k, v in totals.items()},
        "max_rel_error": {k: round(v, 4) for k, v in errors.items()},
        "skipped": skipped,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--queries", type=int, default=5, help="rerank: SciFact requests")
    ap.add_argument("--docs", type=int, default=20, help="rerank: documents per request")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rerank: score the request list this many times"
    )
    ap.add_argument("--arch", default="qwen3-0.6b", help="rerank: bench/rerank.py ARCHS key")
    ap.add_argument("--cpu-gemm", default="auto", help="rerank: the fp32 engine's cpu_gemm")
    ap.add_argument("--bf16", action="store_true", help="rerank: also time the bf16 engine")
    ap.add_argument("--minilm-queries", type=int, default=200)
    ap.add_argument("--minilm-docs", type=int, default=1000, help="random non-relevant docs")
    ap.add_argument("--reps", type=int, default=9, help="linears: timed repetitions")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default: one per core)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; use {', '.join(PARTS)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = header("bench/quant.py", argv) | {"threads": torch.get_num_threads()}
    for part in parts:
        print(f"{part} …", file=sys.stderr, flush=True)
        report[part] = {"linears": bench_linears, "rerank": bench_rerank, "minilm": bench_minilm}[
            part
        ](args)
    return emit(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
