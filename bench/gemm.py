"""Benchmark: one fp32 GEMM of the reranker's shapes three ways on this CPU (why WINNOW_RERANK_CPU_GEMM).

torch's ``F.linear`` (MKL on x86), ``torch.utils.mkldnn.MkldnnLinear`` (oneDNN, layout conversions
per call) and oneDNN's prepacked linear (``mkldnn._linear_pointwise``, what the hf engine uses when it
is faster). GFLOPS, best of ``--reps`` after one warm-up, at torch's default threads.

    .venv/bin/python bench/gemm.py

Never run as a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SHAPES = [(512, 1024, 3072), (512, 3072, 1024), (512, 1024, 2048), (64, 1024, 3072)]


def best(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)

    import torch
    import torch.utils.mkldnn

    from pipeline.rerank.backends.hf.linear import onednn_linear

    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| GEMM (M × K × N) | torch F.linear | MkldnnLinear | oneDNN prepacked | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    torch.manual_seed(0)
    with torch.inference_mode():
        for m, k, n in SHAPES:
            lin = torch.nn.Linear(k, n, bias=False).eval()
            ways = [lin, torch.utils.mkldnn.MkldnnLinear(lin, torch.float), onednn_linear(lin)]
            x = torch.randn(m, k)
            gflop = 2 * m * k * n / 1e9
            rates = [gflop / best(lambda f=f, x=x: f(x), args.reps) for f in ways]
            diff = (ways[2](x) - lin(x)).abs().max().item()
            print(
                f"| {m} × {k} × {n} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[2]:.0f} | {diff:.1e} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
