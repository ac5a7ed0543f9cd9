"""HFEngine returns the model card's scores (fp32 |Δ| ≤ 1e-4), faster, across requests and batchings.

Every path the engine can take on CPU is checked against the card's code (testkit/card_reference.py):
the padded plan with chunked attention on and off, and the packed plan (forced on CPU). Tiny random
Qwen3 checkpoints are built per tokenizer: the real Qwen tokenizer when the shared files exist (skipped
otherwise) and a byte-level BPE built in code (always).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.devices import resolve_dtype
from pipeline.rerank.backends.hf import native
from pipeline.rerank.backends.hf.attention import (
    ATTENTION_CHUNK_CPU,
    ATTENTION_NAME,
    GROUPED_CHUNK_CPU,
    chunked_sdpa,
    grouped_attention,
)
from pipeline.rerank.backends.hf.engine import HFEngine
from pipeline.rerank.backends.hf.fused import compiler_available
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.prompt import PromptTooLong
from testkit.card_reference import CardReference
from testkit.tiny_qwen import build_tiny_reranker, real_tokenizer_available

# Every path the engine can take on a CPU: the padded plan's fused decoder (kernels compiled on a
# CPU with a compiler, or eager), transformers' forward under it (chunked or plain SDPA), packed.
PATHS = {
    "padded": {"plan": "padded", "cpu_gemm": "torch"},
    "padded-onednn": {"plan": "padded", "cpu_gemm": "onednn"},
    "padded-eager-kernels": {"plan": "padded", "compile": "off"},
    "padded-transformers": {"plan": "padded", "fused": False},
    "padded-plain-sdpa": {"plan": "padded", "chunked_attention": False, "fused": False},
    "packed": {"plan": "packed"},
}

TOL = 1e-4
LONG = "Gravity is a force that attracts two bodies towards each other. " * 800  # > 8192 tokens
DOCS = [
    "The capital of China is Beijing.",
    "",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to objects.",
    "  leading spaces and\ttabs",
    "\nstarts with a newline",
    "1998: a year; ümlauts, emoji 🙂 and ‘quotes’",
    "no",
    ": colon first",
    "x" * 300,
]


def _kinds() -> list[Any]:
    real = pytest.param(
        "real",
        marks=pytest.mark.skipif(
            not real_tokenizer_available(), reason="shared Qwen tokenizer files absent"
        ),
    )
    return ["bpe", real]


@pytest.fixture(scope="module", params=_kinds())
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="module")
def card(model_dir: Path) -> CardReference:
    return CardReference(model_dir)


@pytest.fixture(scope="module", params=list(PATHS))
def setup(request: pytest.FixtureRequest, model_dir: Path, card: CardReference) -> Any:
    engine = HFEngine(str(model_dir), device="cpu", dtype="float32", **PATHS[request.param])
    engine.load()
    return model_dir, engine, card


def _assert_close(got: list[float], want: list[float], tol: float = TOL) -> None:
    assert len(got) == len(want)
    diff = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    assert diff <= tol, (diff, got, want)


def test_constructor_is_cheap_and_lazy() -> None:
    engine = HFEngine("/does/not/exist", max_batch_tokens=1024)
    assert not engine.loaded
    assert engine.max_batch_tokens == 1024
    assert engine.counters.pairs_scored == 0


def test_load_sets_device_dtype(setup: Any) -> None:
    _, engine, ref = setup
    assert engine.device == "cpu"
    assert engine.dtype == "float32"
    assert engine.max_batch_tokens and engine.max_batch_tokens > 0
    assert (engine.yes_id, engine.no_id) == (ref.token_true_id, ref.token_false_id)
    assert engine.suffix_ids == ref.suffix_tokens


def test_matches_card_mixed_docs(setup: Any) -> None:
    _, engine, ref = setup
    query = "what is the capital of China?"
    got = engine.score(query, DOCS)
    want = ref.score(query, DOCS)
    _assert_close(got, want)
    assert max(want) - min(want) > 0.05  # the tiny model's scores do spread
    assert all(0.0 <= s <= 1.0 for s in got)


def test_very_long_doc_truncated_like_card(setup: Any) -> None:
    _, engine, ref = setup
    docs = ["short one", LONG]
    _assert_close(engine.score("gravity", docs), ref.score("gravity", docs))


def test_custom_instruction_and_cjk_query(setup: Any) -> None:
    _, engine, ref = setup
    query, instr = "中国的首都是哪里？", "Judge whether the passage names a capital city"
    _assert_close(engine.score(query, DOCS[:5], instr), ref.score(query, DOCS[:5], instr))


def test_input_order_preserved(setup: Any) -> None:
    _, engine, _ = setup
    docs = DOCS[:6]
    fwd = engine.score("q", docs)
    rev = engine.score("q", docs[::-1])
    _assert_close(rev[::-1], fwd, 1e-5)


def test_tiny_budget_many_batches(setup: Any) -> None:
    _, engine, ref = setup
    query = "Explain gravity"
    docs = DOCS
    saved = engine.max_batch_tokens
    engine.max_batch_tokens = 64  # smaller than any row: one row per forward
    try:
        before = engine.counters.forward_passes
        got = engine.score(query, docs)
        assert engine.counters.forward_passes - before >= len(docs)
    finally:
        engine.max_batch_tokens = saved
    _assert_close(got, ref.score(query, docs))


def test_merged_requests_share_forward_passes(setup: Any) -> None:
    _, engine, ref = setup
    reqs = [
        RerankRequest("what is the capital of China?", DOCS[:4]),
        RerankRequest("Explain gravity", DOCS[2:7], "Retrieve physics passages"),
        RerankRequest("Explain gravity", DOCS[2:7], "Retrieve physics passages"),  # same head
        RerankRequest("q", []),
        RerankRequest("a much longer query " * 12, DOCS[6:]),
    ]
    saved = engine.max_batch_tokens, engine.max_padding
    engine.max_batch_tokens, engine.max_padding = 1 << 20, None  # everything in one tail forward
    try:
        got = engine.score_requests(reqs)
    finally:
        engine.max_batch_tokens, engine.max_padding = saved
    assert engine.counters.last_batch_requests == len(reqs)
    assert engine.counters.last_batch_pairs == sum(len(r.docs) for r in reqs)
    # padded: one forward for the 3 unique heads, one for all 19 tails; packed: one for everything
    assert engine.counters.last_batch_forwards == (1 if engine.plan == "packed" else 2)
    assert got[3] == []
    for r, g in zip(reqs, got, strict=True):
        if r.docs:
            _assert_close(g, ref.score(r.query, list(r.docs), r.instruction))


def test_merged_with_small_budget(setup: Any) -> None:
    _, engine, ref = setup
    reqs = [
        RerankRequest("capital", DOCS[:3] + DOCS[5:8]),
        RerankRequest("gravity", DOCS[3:4] + DOCS[8:], "custom"),
    ]
    saved = engine.max_batch_tokens
    engine.max_batch_tokens = 400
    try:
        got = engine.score_requests(reqs)
    finally:
        engine.max_batch_tokens = saved
    for r, g in zip(reqs, got, strict=True):
        _assert_close(g, ref.score(r.query, list(r.docs), r.instruction))


def test_padding_limit_cuts_batches(setup: Any) -> None:
    """Past min_fill, no batch pads beyond max_padding; a long doc does not pad the short ones."""
    _, engine, ref = setup
    if engine.plan != "padded":
        pytest.skip("the packed plan runs no padding")
    docs = [d * k for d in DOCS[:4] for k in (1, 3, 9)] + [DOCS[9]]
    saved = engine.max_batch_tokens, engine.min_fill
    engine.max_batch_tokens, engine.min_fill = 1 << 20, 32
    try:
        plan = engine.tokenize([RerankRequest("gravity", docs)])
        batches = engine.cut_batches(plan)
        assert len(batches) > 1
        assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in plan.pairs)
        for b in batches:
            padded = len(b) * max(len(p.tail) for p in b)
            real = sum(len(p.tail) for p in b)
            assert len(b) == 1 or padded <= max(32, 1.1 * real), (padded, real)
        got = engine.score("gravity", docs)
    finally:
        engine.max_batch_tokens, engine.min_fill = saved
    _assert_close(got, ref.score("gravity", docs))


def test_chosen_path_is_reported(setup: Any) -> None:
    _, engine, _ = setup
    desc = engine.describe()
    assert desc["plan"] == engine.plan and desc["dtype"] == "float32"
    if engine.plan == "padded" and engine._fused is not None:
        # auto: the fused decoder's kernels compiled on a CPU with a compiler
        want = "off" if engine._requested_compile == "off" or not compiler_available() else "on"
        assert desc["compile"] == want
    else:
        assert desc["compile"] == "off"  # the packed forward: unmeasured on GPU, off on CPU
    if engine.plan == "padded" and engine._fused is not None:
        # the fused decoder's own attention on a CPU; in the native op where it loaded (compiled)
        native_op = desc["compile"] == "on" and "float32" in native.dtypes()
        assert desc["attention"] == ("grouped-native" if native_op else "grouped")
    elif engine.plan == "padded" and engine._want_chunked_attention:
        assert engine.chunked_attention and desc["attention"] == "chunked-sdpa"
        assert engine._decoder.config._attn_implementation == ATTENTION_NAME
    elif engine.plan == "padded":
        assert not engine.chunked_attention and desc["attention"] == "sdpa"
    else:
        assert desc["attention"] == "gather"
    want_gemm = engine._requested_cpu_gemm
    if engine.plan == "packed":
        assert desc["cpu_gemm"] == "torch"  # the packed plan fuses the weights itself
    elif want_gemm != "auto":
        assert desc["cpu_gemm"] == want_gemm
    else:
        assert desc["cpu_gemm"] in ("torch", "onednn")  # auto: measured at load
    linears = {type(m).__name__ for m in engine._decoder.modules() if "Linear" in type(m).__name__}
    assert linears == ({"OneDNNLinear"} if desc["cpu_gemm"] == "onednn" else {"Linear"})


def test_auto_plan_is_padded_on_cpu(model_dir: Path) -> None:
    engine = HFEngine(str(model_dir), device="cpu", dtype="float32")
    engine.load()
    assert engine.plan == "padded"


def test_unknown_settings_rejected() -> None:
    for kw in ({"plan": "fast"}, {"compile": "yes"}, {"attention": "flash"}, {"cpu_gemm": "mkl"}):
        with pytest.raises(ValueError):
            HFEngine("/nowhere", **kw)


def head_then_causal(head_len: int, q_len: int) -> torch.Tensor:
    """The padded plan's tail mask for 3 rows: heads left-padded by 0, 5 and 20 keys, then causal."""
    rows = 3
    head_valid = torch.arange(head_len)[None, :] >= torch.tensor([0, 5, 20])[:, None]
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    return torch.cat(
        [head_valid[:, None, :].expand(rows, q_len, -1), causal[None].expand(rows, -1, -1)], -1
    )[:, None]


@pytest.mark.parametrize(
    ("groups", "q_len", "dtype"),
    [
        (1, ATTENTION_CHUNK_CPU * 2 + 45, torch.float32),  # grouped GEMMs, 3 chunks
        (2, ATTENTION_CHUNK_CPU * 2 + 45, torch.float32),
        (2, 9, torch.float32),  # one chunk
        (2, ATTENTION_CHUNK_CPU * 2 + 45, torch.bfloat16),  # SDPA per chunk
    ],
)
def test_chunked_sdpa_equals_masked_sdpa(groups: int, q_len: int, dtype: torch.dtype) -> None:
    """Chunked attention = one masked SDPA call, for a left-padded head + causal, right-padded tail."""
    torch.manual_seed(0)
    rows, heads, dim, head_len = 3, 4, 16, 37
    query = torch.randn(rows, heads, q_len, dim, dtype=dtype)
    key = torch.randn(rows, heads // groups, head_len + q_len, dim, dtype=dtype)
    value = torch.randn_like(key)
    mask = head_then_causal(head_len, q_len)
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    got, _ = chunked_sdpa(module, query, key, value, mask, scaling=0.25)
    rep = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, *rep, attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= (
        1e-5 if dtype == torch.float32 else 2e-2
    )


def test_grouped_attention_bf16_values_in_smaller_chunks() -> None:
    """The bf16 path (fp32 scores, bf16 values) runs GROUPED_CHUNK_CPU-query chunks: 3 here, with a
    left-padded head; it matches one masked fp32 SDPA call within bf16 rounding."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, head_len = 3, 4, 2, 16, 37
    q_len = GROUPED_CHUNK_CPU * 2 + 45
    query = torch.randn(rows, heads, q_len, dim)
    key = torch.randn(rows, kv_heads, head_len + q_len, dim)
    value = torch.randn_like(key).bfloat16()
    mask = head_then_causal(head_len, q_len)
    got = grouped_attention(query, key, value, mask, 0.25)
    rep = key.repeat_interleave(2, 1), value.float().repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, *rep, attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max().item() <= 2e-2


@pytest.mark.parametrize("max_length", [120, 160])
def test_truncation_keeps_suffix(setup: Any, max_length: int) -> None:
    _, engine, ref = setup
    saved = engine.max_length
    engine.max_length = max_length
    try:
        reqs = [
            RerankRequest("short query", DOCS),
            RerankRequest("a longer query about gravity and capitals", [*DOCS[:3], LONG]),
        ]
        plan = engine.tokenize(reqs)
        for p in plan.pairs:
            assert p.tail[-len(engine.suffix_ids) :] == engine.suffix_ids
            assert len(plan.heads[p.head]) + len(p.tail) <= max_length
        assert any(len(plan.heads[p.head]) + len(p.tail) == max_length for p in plan.pairs)
        got = engine.score_requests(reqs)
    finally:
        engine.max_length = saved
    for r, g in zip(reqs, got, strict=True):
        _assert_close(g, ref.score(r.query, list(r.docs), max_length=max_length))


def test_oversized_head_refused_not_cut(setup: Any) -> None:
    """Instruction + query leaving < 16 document tokens: PromptTooLong, whatever the plan."""
    _, engine, _ = setup
    saved = engine.max_length
    engine.max_length = 100
    try:
        with pytest.raises(PromptTooLong):
            engine.score("a very long query that does not fit " * 10, DOCS[:3])
        with pytest.raises(PromptTooLong):  # one bad request fails the merged call it is in
            engine.score_requests(
                [RerankRequest("fine", DOCS[:2]), RerankRequest("q", ["d"], "long instr " * 40)]
            )
        assert len(engine.score("short", DOCS[:2])) == 2  # the engine is still usable
    finally:
        engine.max_length = saved


def test_max_length_too_small_rejected(setup: Any) -> None:
    _, engine, _ = setup
    saved = engine.max_length
    engine.max_length = 20  # prefix + suffix alone are longer
    try:
        with pytest.raises(ValueError):
            engine.score("q", ["d"])
    finally:
        engine.max_length = saved


def test_stats_counters(setup: Any) -> None:
    _, engine, _ = setup
    before = dataclasses.replace(engine.stats())
    engine.score("q", ["a", "b", "c"])
    after = engine.stats()
    assert after.pairs_scored - before.pairs_scored == 3
    assert after.batches - before.batches == 1
    assert after.forward_passes > before.forward_passes
    assert after.tokens_scored > before.tokens_scored
    assert after.padded_tokens >= after.tokens_scored
    assert after.last_batch_pairs == 3


def test_bf16_close_to_card_bf16(tmp_path: Path) -> None:
    path = build_tiny_reranker(tmp_path / "m", "bpe")
    engine = HFEngine(str(path), device="cpu", dtype="bfloat16")
    engine.load()
    assert engine.dtype == "bfloat16"
    ref = CardReference(path, torch.bfloat16)
    _assert_close(engine.score("capital", DOCS[:6]), ref.score("capital", DOCS[:6]), 3e-2)
    packed = HFEngine(str(path), device="cpu", dtype="bfloat16", plan="packed")
    packed.load()
    _assert_close(packed.score("capital", DOCS[:6]), ref.score("capital", DOCS[:6]), 3e-2)


def test_resolve_dtype() -> None:
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")


FORWARD_LIKE = """
import resource, sys, torch
from pipeline.devices import keep_freed_cpu_memory
if sys.argv[1] == "on":
    assert keep_freed_cpu_memory()
def forward():  # a forward's activations, all freed at its end: 160 MB in 100 KB heap blocks
    live = [torch.empty(25_000).fill_(1.0) for _ in range(1_600)]
    del live
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_cpu_memory_is_reused_not_faulted_in_again() -> None:
    """After keep_freed_cpu_memory (a CPU engine's load calls it) a forward's freed heap is kept:
    the next forward's activations reuse its pages. glibc's default trims the heap top on free, so
    they fault in fresh ones (strace of a 20-document fp32 request: 84 brk calls, ~500,000 faults).
    Fresh processes: the setting is process-wide."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", FORWARD_LIKE, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout.split()[-1])

    default, kept = faults("off"), faults("on")
    if default < 2_000:
        pytest.skip(f"this glibc keeps freed heap memory by default ({default} faults)")
    assert kept < default / 10, (kept, default)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["gather", "varlen"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_packed_matches_card(tmp_path: Path, dtype: str, attention: str) -> None:
    """CUDA: the packed plan (the auto plan there) vs the card on the GPU, fp32 1e-4, bf16 2e-2."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from pipeline.rerank.backends.hf.attention import varlen_available

    if attention == "varlen" and not varlen_available("cuda"):
        pytest.skip("torch.nn.attention.varlen absent")
    path = build_tiny_reranker(tmp_path / "m", "auto")
    engine = HFEngine(str(path), device="cuda", dtype=dtype, attention=attention)
    engine.load()
    assert engine.plan == "packed" and engine.attention_path == attention
    ref = CardReference(path, getattr(torch, dtype), "cuda")
    tol = TOL if dtype == "float32" else 2e-2
    reqs = [
        RerankRequest("what is the capital of China?", DOCS),
        RerankRequest("Explain gravity", [*DOCS[2:7], LONG], "Retrieve physics passages"),
        RerankRequest("what is the capital of China?", DOCS[:3]),
    ]
    got = engine.score_requests(reqs)
    for r, g in zip(reqs, got, strict=True):
        _assert_close(g, ref.score(r.query, list(r.docs), r.instruction), tol)
