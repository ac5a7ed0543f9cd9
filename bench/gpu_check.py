"""One-command GPU check of the transformers reranker (driven by bench/gpu_check.sh).

Steps, each recorded in ``<out>/results.json`` and summarised in ``<out>/summary.md``:

1. equality vs the model card's code (testkit/card_reference.py) on tiny random Qwen3 models, fp32
   (bound 1e-4) and bf16 (bound 2e-2), for every engine path available on the device: padded, packed
   with the gather kernel, packed with the varlen kernel (CUDA + torch.nn.attention.varlen), and
   packed with ``compile=on`` (unless ``--no-compile``);
2. bench/rerank.py on the real Qwen3-Reranker-0.6B architecture (random weights), SciFact, per
   request and merged, vs the card; engine-only runs of the padded plan and of the varlen kernel;
3. a torch.profiler summary per plan: op launches, CUDA kernel launches and host syncs per request;
4. bench/peers.py: the same SciFact requests through Winnow's transformers engine (packed plan on
   CUDA) and vLLM's pooling runner, per request and 8 merged, in one call; where vLLM is not
   installed its rows say so and the rest of the check stands.

Needs only torch + transformers (+ tokenizers, + vllm for step 4's vLLM rows); no network. ``--device cpu --quick`` is the dry run
that proves the script itself works on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

DOCS = [
    "The capital of China is Beijing.",
    "",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to objects.",
    "1998: a year; ümlauts, emoji 🙂 and ‘quotes’",
    "x" * 300,
    "Gravity is a force that attracts two bodies towards each other. " * 300,
]


def _paths(device: str, compile_too: bool) -> dict[str, dict[str, str]]:
    """Engine paths to check on ``device`` (compile only where asked: it costs a minute each)."""
    from pipeline.rerank.backends.hf.attention import varlen_available

    paths = {"padded": {"plan": "padded"}, "packed-gather": {"plan": "packed"}}
    if varlen_available(device):
        paths["packed-varlen"] = {"plan": "packed", "attention": "varlen"}
    if compile_too:
        paths["packed-gather-compiled"] = {"plan": "packed", "compile": "on"}
    return paths


def equality(device: str, dtypes: list[str], compile_too: bool, work: Path) -> list[dict[str, Any]]:
    """max |Δ| vs the card per (tokenizer, dtype, path) over merged requests with shared heads."""
    import torch

    from pipeline.rerank.backends.hf.engine import HFEngine
    from pipeline.rerank.base import RerankRequest
    from testkit import tiny_qwen
    from testkit.card_reference import CardReference

    shared = Path(os.environ.get("WINNOW_SHARED", str(ROOT.parent / "shared")))
    tiny_qwen.REAL_TOKENIZER_DIR = shared / "models" / "qwen3-tokenizer"
    kinds = ["bpe"] + (["real"] if tiny_qwen.real_tokenizer_available() else [])
    reqs = [
        RerankRequest("what is the capital of China?", DOCS),
        RerankRequest("Explain gravity", DOCS[2:], "Retrieve physics passages"),
        RerankRequest("what is the capital of China?", DOCS[:3]),
    ]
    rows = []
    for kind in kinds:
        path = tiny_qwen.build_tiny_reranker(work / f"tiny-{kind}", kind)
        for dtype in dtypes:
            ref = CardReference(path, getattr(torch, dtype), device)
            want = [ref.score(r.query, list(r.docs), r.instruction) for r in reqs]
            bound = 1e-4 if dtype == "float32" else 2e-2
            # compile once per dtype (first tokenizer): each compile costs about a minute
            for name, kw in _paths(device, compile_too and kind == kinds[0]).items():
                row: dict[str, Any] = {"tokenizer": kind, "dtype": dtype, "path": name}
                try:
                    engine = HFEngine(str(path), device=device, dtype=dtype, **kw)
                    engine.load()
                    got = engine.score_requests(reqs)
                    diff = max(
                        abs(a - b)
                        for g, w in zip(got, want, strict=True)
                        for a, b in zip(g, w, strict=True)
                    )
                    row.update(max_abs_diff=diff, bound=bound, ok=diff <= bound)
                    row.update(engine.describe())
                except Exception as exc:  # record and go on: one broken path must not hide the rest
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                print(f"  equality {row}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def run_bench(name: str, argv: list[str], out: Path) -> dict[str, Any]:
    """bench/rerank.py main() in-process; its JSON result (or the error)."""
    import rerank

    return run_step(name, rerank.main, argv, out)


def run_peers(argv: list[str], out: Path) -> dict[str, Any]:
    """bench/peers.py (hf vs vLLM, each in its own child process); its JSON result (or the error)."""
    import peers

    return run_step("peers", peers.main, argv, out)


def run_step(name: str, main: Callable[[list[str]], int], argv: list[str], out: Path) -> dict:
    """One benchmark's ``main`` with ``--json``; its result, or the error, and its wall time."""
    target = out / f"{name}.json"
    t0 = time.perf_counter()
    print(f"== {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        main([*argv, "--json", str(target)])
        result = json.loads(target.read_text(encoding="utf-8"))
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _free()
    return result


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="dry run: tiny shapes, fp32, 1 query")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile=on paths")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu --quick for a dry run")
        return 2
    compile_too = not args.no_compile and not args.quick
    dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else _cpu(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    results["bench"] = {}

    def save() -> None:  # after every step: a timeout still leaves what was measured
        results["wall_seconds"] = round(time.perf_counter() - t0, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
        (args.out / "summary.md").write_text(summary(results), encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="winnow-gpu-check-") as tmp:
        print("== equality vs the card", file=sys.stderr, flush=True)
        results["equality"] = equality(device, dtypes, compile_too, Path(tmp))
    _free()
    save()

    dtype = "float32" if args.quick else "bfloat16"
    arch = ["--arch", "narrow28"] if args.quick else []
    q = (
        ["--queries", "1", "--docs-per-query", "4"]
        if args.quick
        else ["--queries", str(args.queries)]
    )
    base = ["--device", device, "--dtype", dtype, *arch, *q]
    prof = ["--profile", "2" if args.quick else "5"]
    benches: dict[str, list[str]] = {
        # the service's default on this device (auto plan) vs the card, per request and merged
        "auto": [*base, "--skip-small-batch", *prof],
        # the padded plan (today's CPU engine) on the same device: the before figure
        "padded": [*base, "--plan", "padded", "--engine-only", "--skip-merged", *prof],
    }
    from pipeline.rerank.backends.hf.attention import varlen_available

    if varlen_available(device):
        benches["packed-varlen"] = [
            *base,
            "--plan",
            "packed",
            "--attention",
            "varlen",
            "--engine-only",
            *prof,
        ]
    if compile_too:
        benches["packed-compiled"] = [
            *base,
            "--plan",
            "packed",
            "--compile",
            "on",
            "--engine-only",
            *prof,
        ]
    for name, bench_argv in benches.items():
        results["bench"][name] = run_bench(name, bench_argv, args.out)
        save()
    peers_argv = ["--device", device, "--dtypes", dtype]
    if args.quick:
        peers_argv += ["--queries", "1", "--concurrent", "2", "--docs-per-query", "4"]
    else:
        peers_argv += ["--queries", "5", "--concurrent", "8"]
    results["peers"] = run_peers(peers_argv, args.out)
    save()
    print(summary(results))
    ok = all(r.get("ok") for r in results["equality"]) and not any(
        "error" in b for b in results["bench"].values()
    )
    return 0 if ok else 1


def _cpu() -> str:
    from rerank import _cpu_name  # bench/rerank.py (bench/ is on sys.path above)

    return _cpu_name()


def summary(results: dict[str, Any]) -> str:
    """Markdown: equality table, bench rows, profile counts per request."""
    lines = [
        f"# Winnow reranker GPU check — {results['date']}",
        "",
        f"Device: {results['device']}; torch {results['torch']}, transformers "
        f"{results.get('transformers', '?')}, Python {results['python']}; "
        f"`{results['command']}`; {results.get('wall_seconds', '?')} s.",
        "",
        "## Equality vs the model card (tiny random Qwen3, merged requests, shared heads)",
        "",
        "| tokenizer | dtype | path | attention | compile | max abs diff | bound | ok |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    fmt: Callable[[Any], str] = lambda v: f"{v:.2e}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in results["equality"]:
        lines.append(
            f"| {r['tokenizer']} | {r['dtype']} | {r['path']} | {r.get('attention', '')} | "
            f"{r.get('compile', '')} | {fmt(r.get('max_abs_diff', r.get('error', '')))} | "
            f"{fmt(r.get('bound', ''))} | {'yes' if r.get('ok') else 'NO'} |"
        )
    lines += ["", "## bench/rerank.py", ""]
    for name, b in results["bench"].items():
        lines.append(f"### {name}: `{b.get('command', '')}` ({b.get('wall_seconds')} s)")
        if "error" in b:
            lines += ["", f"error: {b['error']}", ""]
            continue
        eng = b.get("engine", {})
        lines.append("")
        lines.append(
            f"plan={eng.get('plan')} attention={eng.get('attention')} compile={eng.get('compile')} "
            f"dtype={eng.get('dtype')} max_batch_tokens={eng.get('max_batch_tokens')} "
            f"load {eng.get('load_seconds')} s; {b.get('pairs')} pairs, "
            f"{b.get('reference_tokens')} reference tokens"
        )
        lines.append("")
        if "runs" in b:
            lines += [
                "| run | s | pairs/s | tokens/s | peak extra MiB | max abs diff vs card |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for r in b["runs"]:
                lines.append(
                    f"| {r['name']} | {r['seconds']} | {r['pairs_per_s']} | {r['tokens_per_s']} | "
                    f"{r['peak_extra_mib']} | {fmt(r['max_abs_diff_vs_card'])} |"
                )
            lines.append(f"\nspeed-up vs card (1 batch/query): {b.get('speedup_vs_card_1batch')}×")
        else:
            lines.append(
                f"engine per request: {b.get('seconds')} s, {b.get('pairs_per_s')} pairs/s, "
                f"{b.get('tokens_per_s')} tokens/s"
            )
        if "profile" in eng:
            lines.append(f"\nprofile per request: `{json.dumps(eng['profile'])}`")
        lines.append("")
    peers = results.get("peers")
    if peers is not None:
        lines += ["## bench/peers.py: Winnow hf engine vs vLLM, same requests", ""]
        if "error" in peers:
            lines += [f"error: {peers['error']}", ""]
        else:
            lines += [
                f"`{peers.get('command')}` ({peers.get('wall_seconds')} s)",
                "",
                "| dtype | engine | mode | s | pairs/s | tokens/s | max abs diff vs hf | hf speed ratio |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
            ]
            for e in peers.get("results", []):
                if "error" in e:
                    lines.append(f"| {e['dtype']} | {e['run']} | error: {e['error'][-200:]} |||||")
                    continue
                for r in e["rows"]:
                    lines.append(
                        f"| {e['dtype']} | {e['engine']} | {r['mode']} | {r['seconds']} | "
                        f"{r['pairs_per_s']} | {r['tokens_per_s']} | "
                        f"{fmt(e.get('max_abs_diff_vs_hf', ''))} | {e.get('hf_speed_ratio', '')} |"
                    )
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
