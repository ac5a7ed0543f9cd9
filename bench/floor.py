"""Benchmark: the floor of bench/peers.py's runs on this CPU, and each engine's share of it.

The floor is the work no exact engine can skip, at the GEMM rates this machine reaches now:

- linears: every real token of a request through every layer's q/k/v/o and MLP GEMMs, its head
  (prefix + instruction + query) once, and past the last layer's K/V only each pair's scored token
  (what the padded plan runs, less its padding);
- attention: the causal triangle only (each tail token against its head and the tail tokens before
  it), both GEMMs from operands in the run's dtype (in bf16 the scores accumulate and come out in
  fp32, as the native op of pipeline/rerank/backends/hf/csrc/attention.cpp runs them; timed as
  torch's bf16 ``bmm``, whose output is bf16, at the same FLOPs);
- rates: oneDNN's prepacked linear (the hf engine's GEMM) on each linear's shape and batched GEMMs
  on the attention's shapes, best of ``--reps``, measured in this process.

Elementwise work (norms, RoPE, softmax, SiLU) is left out, so no engine reaches the floor. With
``--peers`` (a bench/peers.py JSON from this machine) it prints each engine's seconds as a share of
the floor and the share a given ratio over vLLM would take: how much of a speed goal is left to win
by an engine, and how much no engine can win.

    .venv/bin/python bench/floor.py --queries 2 --concurrent 4 --peers bench/results/peers-bf16.json

Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from gemm import best  # noqa: E402
from rerank import build_model_dir, load_scifact  # noqa: E402


def work(plan: Any, cfg: Any) -> dict[str, float]:
    """FLOPs per kind of GEMM of one tokenized plan (see the module docstring)."""
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * dim, cfg.num_key_value_heads * dim
    qkv = 2 * hidden * (q_out + 2 * kv_out)  # per token
    kv = 2 * hidden * 2 * kv_out
    rest = 2 * q_out * hidden + 2 * 3 * hidden * inter  # o_proj + gate, up, down
    per_q = 2 * q_out  # one query against one key, per GEMM (scores or values)
    out = {"linear": 0.0, "scores": 0.0, "values": 0.0, "tokens": 0.0}
    for head in plan.heads:  # layers 0..L-2 whole, the last one's K/V only
        h = len(head)
        out["linear"] += h * ((layers - 1) * (qkv + rest) + kv)
        out["scores"] += (layers - 1) * per_q * h * (h + 1) / 2
        out["tokens"] += h
    for p in plan.pairs:
        h, t = len(plan.heads[p.head]), len(p.tail)
        out["linear"] += t * ((layers - 1) * (qkv + rest) + kv) + (qkv - kv) + rest
        out["scores"] += (layers - 1) * per_q * (t * h + t * (t + 1) / 2) + per_q * (h + t)
        out["tokens"] += t
    out["values"] = out["scores"]
    return out


def rates(cfg: Any, dtype: Any, rows: int, reps: int) -> dict[str, float]:
    """FLOP/s of the linears (prepacked oneDNN, FLOP-weighted over the layer's shapes) and of the
    attention's two batched GEMMs (a 128-query chunk of each KV head's query group against 512 keys)."""
    import torch

    from pipeline.rerank.backends.hf.linear import onednn_linear

    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * dim, cfg.num_key_value_heads * dim
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden)]
    shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]
    flops = seconds = 0.0
    with torch.inference_mode():
        for k, n in shapes:
            lin = onednn_linear(torch.nn.Linear(k, n, bias=False).to(dtype).eval())
            x = torch.randn(rows, k, dtype=dtype)
            seconds += best(lambda lin=lin, x=x: lin(x), reps)
            flops += 2 * rows * k * n
        groups, chunk, keys = cfg.num_attention_heads // cfg.num_key_value_heads, 128, 512
        batch = 4 * cfg.num_key_value_heads
        q = torch.randn(batch, groups * chunk, dim, dtype=dtype)
        k_t = torch.randn(batch, dim, keys, dtype=dtype)
        p = torch.randn(batch, groups * chunk, keys, dtype=dtype)
        v = torch.randn(batch, keys, dim, dtype=dtype)
        gemm = 2 * batch * groups * chunk * keys * dim
        scores = gemm / best(lambda: torch.bmm(q, k_t), reps)
        values = gemm / best(lambda: torch.bmm(p, v), reps)
    return {"linear": flops / seconds, "scores": scores, "values": values}


def floor_seconds(w: dict[str, float], r: dict[str, float]) -> float:
    return sum(w[kind] / r[kind] for kind in ("linear", "scores", "values"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=2, help="as bench/peers.py --queries")
    ap.add_argument("--concurrent", type=int, default=4, help="as bench/peers.py --concurrent")
    ap.add_argument("--docs-per-query", type=int, default=20)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=1792, help="tokens per linear GEMM")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--goal", type=float, default=1.2, help="a speed ratio over vLLM to price")
    ap.add_argument("--peers", type=Path, action="append", default=[], help="bench/peers.py JSON")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/winnow-bench-qwen3-0.6b"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.rerank.backends.hf.plan import tokenize
    from pipeline.rerank.prompt import encode_fixed

    path = str(build_model_dir(args.model_dir))
    cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prefix, suffix = encode_fixed(tok)
    reqs = load_scifact(max(args.queries, args.concurrent), args.docs_per_query)
    modes = {
        "per request": [[r] for r in reqs[: args.queries]],  # one after another: heads never shared
        "merged": [reqs[: args.concurrent]],
    }
    works = {}
    for mode, calls in modes.items():
        plans = [tokenize(tok, c, prefix, suffix, args.max_length) for c in calls]
        parts = [work(p, cfg) for p in plans]
        works[mode] = {k: sum(p[k] for p in parts) for k in parts[0]}
        works[mode]["card_tokens"] = sum(p.reference_tokens for p in plans)
    peers: dict[str, dict[str, Any]] = {}
    for f in args.peers:
        for res in json.loads(f.read_text(encoding="utf-8"))["results"]:
            peers.setdefault(res["dtype"], {})[res["run"]] = res
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {args.rows} rows a GEMM")
    for name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, name)
        r = rates(cfg, dtype, args.rows, args.reps)
        print(
            f"\n{name}: linears {r['linear'] / 1e9:.0f} GFLOPS, attention scores (fp32) "
            f"{r['scores'] / 1e9:.0f}, probabilities × values {r['values'] / 1e9:.0f}"
        )
        print("| mode | card tokens | linear TFLOP | attention TFLOP | floor s | floor tokens/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        floor_rate = {}  # floor tokens/s per mode
        for mode, w in works.items():
            s = floor_seconds(w, r)
            floor_rate[mode] = w["card_tokens"] / s
            print(
                f"| {mode} | {w['card_tokens']:.0f} | {w['linear'] / 1e12:.2f} | "
                f"{(w['scores'] + w['values']) / 1e12:.2f} | {s:.1f} | {w['card_tokens'] / s:.0f} |"
            )
        runs = peers.get(name, {})
        if not runs:
            continue
        print(f"| engine ({name}) | mode | tokens/s | floor ÷ its seconds |")
        print("| --- | --- | ---: | ---: |")
        goal: dict[str, float] = {}
        for key, run in runs.items():
            for row in run.get("rows", []):
                mode = "merged" if row["mode"].startswith("merged") else "per request"
                if "Winnow vLLM backend" in row["mode"] or "int8" in key:
                    continue  # int8 is not an engine of this dtype's floor
                share = row["tokens_per_s"] / floor_rate[mode]
                print(f"| {key} | {mode} | {row['tokens_per_s']:.1f} | {share:.0%} |")
                if key.startswith("vllm"):
                    goal[mode] = max(goal.get(mode, 0.0), share * args.goal)
        for mode, share in goal.items():
            print(f"{args.goal}× vLLM {mode} takes {share:.0%} of the floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
