"""Benchmark: the Qwen3-Reranker model-card code vs Winnow's HFEngine, same model, dtype and machine.

The model has the real Qwen3-Reranker-0.6B architecture (config values from the model card) with random
weights, since no weights can be downloaded here; speed and exactness do not depend on the values.
Queries and documents come from SciFact: for each train query, its qrel documents plus the documents
with the most query-word overlap, up to --docs-per-query.

The reference is timed as the card uses it (all pairs of a query in one batch) and at a small fixed batch
(less padding). Reported: pairs/s, tokens/s (reference tokens, no padding), peak memory, max |Δscore|.

    .venv/bin/python bench/rerank.py --queries 5 --docs-per-query 20 --dtype float32 --json out.json
    .venv/bin/python bench/rerank.py --queries 1 --docs-per-query 6 --engine-only --no-chunked-attention
    python bench/rerank.py --device cuda --dtype bfloat16 --queries 20 --vllm   # GPU, winnow[gpu]

``--profile N`` adds a torch.profiler summary of N single requests (after one warm-up): aten ops and
leaf compute ops per request on any device, CUDA kernel launches and host syncs on CUDA, and scalar
reads (``tolist``/``item``: a host sync each when the tensor lives on a GPU). ``--plan packed`` forces
the padding-free CUDA plan on any device; ``--arch narrow28`` profiles a 28-layer model of hidden 64:
the same op graph as the 0.6B model at a fraction of the cost (op counts do not depend on width).
Imports only pipeline.rerank.* and testkit/card_reference.py: runs on a bare torch + transformers box.

    python bench/rerank.py --queries 1 --plan packed --arch narrow28 --engine-only --profile 3

Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from pipeline.rerank.backends.hf.engine import HFEngine  # noqa: E402
from pipeline.rerank.base import RerankRequest  # noqa: E402
from testkit.card_reference import CardReference  # noqa: E402

SHARED = Path(os.environ.get("WINNOW_SHARED", str(ROOT.parent / "shared")))
SCIFACT = SHARED / "data" / "scifact"
TOKENIZER_DIR = SHARED / "models" / "qwen3-tokenizer"
# Qwen3-Reranker-0.6B config.json values (model card).
QWEN3_RERANKER_06B = dict(
    vocab_size=151669,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
)


# --- data -----------------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}


def load_scifact(n_queries: int, docs_per_query: int, seed: int = 0) -> list[RerankRequest]:
    """SciFact train queries with realistic candidate lists (qrels + lexical neighbours), seeded."""
    corpus = {}
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d.get("text", "")).strip()
    queries = {}
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            queries[d["_id"]] = d["text"]
    qrels: dict[str, list[str]] = {}
    with open(SCIFACT / "qrels" / "train.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, _ = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, []).append(did)
    rng = random.Random(seed)
    qids = sorted(q for q in qrels if q in queries)
    rng.shuffle(qids)
    doc_ids = list(corpus)
    doc_words = {d: _words(corpus[d]) for d in doc_ids}
    out = []
    for qid in qids[:n_queries]:
        qw = _words(queries[qid])
        chosen = [d for d in qrels[qid] if d in corpus][:docs_per_query]
        ranked = sorted(doc_ids, key=lambda d: -len(qw & doc_words[d]))
        for d in ranked:
            if len(chosen) >= docs_per_query:
                break
            if d not in chosen:
                chosen.append(d)
        rng.shuffle(chosen)
        out.append(RerankRequest(queries[qid], [corpus[d] for d in chosen]))
    return out


# --- model ----------------------------------------------------------------------------------------
# Same depth, heads and op graph as the 0.6B model, ~1/16 the width: op-count profiles on a CPU.
NARROW28 = {
    **QWEN3_RERANKER_06B,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
ARCHS = {"qwen3-0.6b": QWEN3_RERANKER_06B, "narrow28": NARROW28}


def build_model_dir(out: Path, arch: str = "qwen3-0.6b") -> Path:
    """Random-weight Qwen3-Reranker-shaped checkpoint + real tokenizer, cached on disk."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if TOKENIZER_DIR.is_dir():
        tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    else:  # no shared tokenizer: fall back to the tests' byte-level BPE (vocab padded to the card's)
        from testkit.tiny_qwen import build_bpe_tokenizer

        tok = build_bpe_tokenizer()
    torch.manual_seed(0)
    config = dict(ARCHS[arch])
    config["vocab_size"] = max(config["vocab_size"], len(tok))
    model = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# --- measurement ----------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS (sampled) or CUDA max-allocated during a block, relative to its start."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _rss_bytes()
            self.peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self._base) / 2**20


def timed(
    name: str,
    device: str,
    reqs: Sequence[RerankRequest],
    fn: Callable[[RerankRequest], list[float]],
) -> dict[str, Any]:
    import torch

    fn(RerankRequest(reqs[0].query, reqs[0].docs[:2]))  # warm-up (oneDNN primitives), not timed
    scores: list[list[float]] = []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for r in reqs:
            scores.append(fn(r))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    print(f"  {name}: {seconds:.1f}s", file=sys.stderr, flush=True)
    return {"name": name, "seconds": seconds, "peak_extra_mib": mem.extra_mib, "scores": scores}


def _per_request(engine: HFEngine) -> Callable[[RerankRequest], list[float]]:
    return lambda r: engine.score(r.query, r.docs, r.instruction)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--docs-per-query", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--max-padding", type=float, default=0.1, help="negative = no padding limit")
    ap.add_argument(
        "--small-batch", type=int, default=4, help="fixed batch for the 2nd reference run"
    )
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--model-dir", type=Path, default=None, help="default /tmp/winnow-bench-<arch>")
    ap.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    ap.add_argument("--plan", default="auto", choices=["auto", "padded", "packed"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--attention", default="auto", choices=["auto", "gather", "varlen"])
    ap.add_argument("--cpu-gemm", default="auto", choices=["auto", "torch", "onednn"])
    ap.add_argument(
        "--profile", type=int, default=0, help="torch.profiler over N single requests (counts)"
    )
    ap.add_argument("--skip-merged", action="store_true", help="no all-requests-merged run")
    ap.add_argument("--skip-small-batch", action="store_true")
    ap.add_argument(
        "--no-chunked-attention", action="store_true", help="plain SDPA in the engine (ablation)"
    )
    ap.add_argument(
        "--vllm", action="store_true", help="also time the vLLM backend (GPU, needs winnow[gpu])"
    )
    ap.add_argument(
        "--engine-only", action="store_true", help="time the engine per request only (ablations)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from pipeline.devices import resolve_device

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    reqs = load_scifact(args.queries, args.docs_per_query)
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = Path(f"/tmp/winnow-bench-{args.arch}")
    path = str(build_model_dir(model_dir, args.arch))
    n_pairs = sum(len(r.docs) for r in reqs)

    engine = HFEngine(
        path,
        device=device,
        dtype=args.dtype,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        max_padding=None if args.max_padding < 0 else args.max_padding,
        chunked_attention=not args.no_chunked_attention,
        plan=args.plan,
        compile=args.compile,
        attention=args.attention,
        cpu_gemm=args.cpu_gemm,
    )
    t_load = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - t_load
    # Tokens the reference runs (no padding): the throughput unit for every row.
    ref_tokens = engine.tokenize(reqs).reference_tokens
    engine_config = {
        **engine.describe(),
        "arch": args.arch,
        "max_padding": engine.max_padding,
        "min_fill": engine.min_fill,
        "chunked_attention": engine.chunked_attention,
        "load_seconds": round(load_s, 2),
    }
    if args.profile:
        engine_config["profile"] = profile_requests(engine, reqs, device, args.profile)
    runs = [
        timed(
            "winnow HFEngine (per request)",
            device,
            reqs,
            _per_request(engine),
        )
    ]
    if args.engine_only:
        return _report(
            args,
            argv,
            {
                "device": device,
                "queries": len(reqs),
                "pairs": n_pairs,
                "reference_tokens": ref_tokens,
                "engine": engine_config,
                "seconds": round(runs[0]["seconds"], 3),
                "pairs_per_s": round(n_pairs / runs[0]["seconds"], 3),
                "tokens_per_s": round(ref_tokens / runs[0]["seconds"], 1),
                **_tail_tokens(engine, reqs),
            },
        )
    merged: dict[str, Any] | None = None
    if not args.skip_merged:
        merged = {"name": "winnow HFEngine (all requests merged)"}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        merged["scores"] = engine.score_requests(reqs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        merged["seconds"] = time.perf_counter() - t0
        merged["peak_extra_mib"] = float("nan")
        print(f"  {merged['name']}: {merged['seconds']:.1f}s", file=sys.stderr, flush=True)
    del engine
    import gc

    gc.collect()

    # keep_last=False: the card as written projects every position onto the vocabulary (timed as used)
    ref = CardReference(path, dtype, device, args.max_length, keep_last=False)
    runs.append(
        timed(
            "card reference, 1 batch/query",
            device,
            reqs,
            lambda r: ref.score(r.query, r.docs, r.instruction),
        )
    )
    if not args.skip_small_batch:
        runs.append(
            timed(
                f"card reference, batch {args.small_batch}",
                device,
                reqs,
                lambda r: ref.score(r.query, r.docs, r.instruction, batch_size=args.small_batch),
            )
        )
    if merged is not None:
        runs.append(merged)
    if args.vllm:
        del ref
        gc.collect()
        runs.append(_time_vllm(args, path, device, reqs))

    base = runs[1]["scores"]
    flat_base = [s for q in base for s in q]
    rows = []
    for run in runs:
        flat = [s for q in run["scores"] for s in q]
        rows.append(
            {
                "name": run["name"],
                "seconds": round(run["seconds"], 3),
                "pairs_per_s": round(n_pairs / run["seconds"], 3),
                "tokens_per_s": round(ref_tokens / run["seconds"], 1),
                "peak_extra_mib": round(run["peak_extra_mib"], 1),
                "max_abs_diff_vs_card": max(
                    abs(a - b) for a, b in zip(flat, flat_base, strict=True)
                ),
            }
        )
    winnow = rows[0]["pairs_per_s"]
    result = {
        "device": device,
        "queries": len(reqs),
        "pairs": n_pairs,
        "reference_tokens": ref_tokens,
        "mean_pair_tokens": round(ref_tokens / n_pairs, 1),
        "engine": engine_config,
        "runs": rows,
        "speedup_vs_card_1batch": round(winnow / rows[1]["pairs_per_s"], 2),
    }
    if not args.skip_small_batch:
        result["speedup_vs_card_small_batch"] = round(winnow / rows[2]["pairs_per_s"], 2)
    return _report(args, argv, result)


def _time_vllm(
    args: argparse.Namespace, path: str, device: str, reqs: Sequence[RerankRequest]
) -> dict[str, Any]:
    """The vLLM backend as the service calls it: one ``score`` per request."""
    from pipeline.rerank.backends.vllm import VLLMEngine

    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    engine = VLLMEngine(path, max_model_len=args.max_length, dtype=args.dtype)
    engine.load()
    return timed(
        "winnow vLLM backend (per request)",
        device,
        reqs,
        lambda r: engine.score_requests([r])[0],
    )


VIEW_OPS = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::slice",
    "aten::select",
    "aten::transpose",
    "aten::t",
    "aten::permute",
    "aten::expand",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::as_strided",
    "aten::split",
    "aten::split_with_sizes",
    "aten::unbind",
    "aten::narrow",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::result_type",
    "aten::contiguous",
    "aten::to",
    "aten::_to_copy_view",
}  # metadata only: no kernel runs
LAUNCH_NAMES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}
SYNC_NAMES = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def profile_requests(
    engine: HFEngine, reqs: Sequence[RerankRequest], device: str, n: int
) -> dict[str, Any]:
    """torch.profiler over ``n`` single requests: ops, kernel launches and syncs per request."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sample = [reqs[i % len(reqs)] for i in range(n)]
    warm = sample[0]
    engine.score_requests([RerankRequest(warm.query, warm.docs[:2], warm.instruction)])  # warm-up
    acts = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    reads = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item")}

    def counting(name: str) -> Any:
        def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
            reads["n"] += 1
            return originals[name](self, *a, **kw)

        return wrapper

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    forwards0 = engine.counters.forward_passes
    try:
        with profile(activities=acts) as prof:
            for r in sample:
                engine.score_requests([r])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    # Top level = called by the engine's Python code (not inside another aten op): one dispatch each;
    # without the metadata-only views that is the number of op launches (≈ kernels on CUDA).
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    launched = [e for e in top if e.name not in VIEW_OPS]
    launches = sum(1 for e in events if e.name in LAUNCH_NAMES)
    syncs = sum(1 for e in events if e.name in SYNC_NAMES)
    scalar = sum(1 for e in aten if e.name == "aten::_local_scalar_dense")
    out = {
        "requests": n,
        "pairs_per_request": round(sum(len(r.docs) for r in sample) / n, 1),
        "forwards_per_request": round((engine.counters.forward_passes - forwards0) / n, 2),
        "aten_ops_per_request": round(len(aten) / n, 1),
        "top_level_aten_ops_per_request": round(len(top) / n, 1),
        "op_launches_per_request": round(len(launched) / n, 1),
        "scalar_reads_per_request": round((reads["n"] + scalar) / n, 2),
    }
    if device.startswith("cuda"):
        out["cuda_kernel_launches_per_request"] = round(launches / n, 1)
        out["cuda_syncs_per_request"] = round(syncs / n, 2)
    print(f"  profile: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def _tail_tokens(engine: HFEngine, reqs: Sequence[RerankRequest]) -> dict[str, int]:
    """Document-side tokens the per-request forwards run, with and without padding."""
    padded = real = 0
    for r in reqs:
        for batch in engine.cut_batches(engine.tokenize([r])):
            padded += len(batch) * max(len(p.tail) for p in batch)
            real += sum(len(p.tail) for p in batch)
    return {"tail_tokens_padded": padded, "tail_tokens_real": real}


def _report(args: argparse.Namespace, argv: Sequence[str] | None, body: dict[str, Any]) -> int:
    """Print (and with --json write) the result with the machine and command that produced it."""
    return emit({**header("bench/rerank.py", argv), "dtype": args.dtype, **body}, args.json)


def header(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Date, machine, versions and the command line: the head of every benchmark's report."""
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]),
    }


def emit(report: dict[str, Any], path: Path | None) -> int:
    """Print the report as JSON and write it to ``path`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
