"""The native CPU attention op (pipeline/rerank/backends/hf/native.py, csrc/attention.cpp).

- its attention equals the torch path's (:func:`attention.grouped_attention`) with the mask that
  ``first`` stands for (:func:`native.visible_mask`), on the real queries, packed row after row:
  fp32 within 1e-5 of fp64, bf16 no farther from fp64 than the torch path (fp32 scores, bf16
  probabilities × values), for left-padded heads (by less than a key tile and by more), rows with
  right padding (a partial query tile, whole tiles of padding), query tiles of 16 with a shorter last
  one, one query per row, key counts that are not a multiple of the 64-key tile;
- a padding query's inputs do not change a real query's output;
- a cached head's keys and values given apart (``past``, broadcast over rows, strided) pack into
  the same tiles as their concatenation, so give the same attention bit for bit;
- bad ``first``/``lens`` are refused with what is wrong, not read out of bounds;
- an engine uses it where it loaded for its dtype, and scores as the engine without it does;
- a broken build raises with the compiler's message (``dtypes`` then logs it and keeps torch).

Where it cannot load (no compiler; an ISA without oneDNN's bf16 brgemm) the tests skip with the
reason, except on a CPU with avx512_bf16 and a compiler, where it must load.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.rerank.backends.hf import fused, native
from pipeline.rerank.backends.hf.attention import grouped_attention
from pipeline.rerank.backends.hf.engine import HFEngine
from testkit.tiny_qwen import build_tiny_reranker
from tests.test_rerank_fused import REQUESTS, _max_diff


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def op() -> frozenset[str]:
    if not fused.compiler_available():
        pytest.skip("no C++ compiler: the native attention op cannot be built")
    loaded = native.dtypes()
    if _has_avx512_bf16():
        assert loaded == {"bfloat16", "float32"}, "it must load on an avx512_bf16 CPU (see log)"
    if not loaded:
        pytest.skip("the native attention op did not load on this CPU (the log says why)")
    return loaded


def _need(op: frozenset[str], dtype: torch.dtype) -> None:
    if str(dtype).removeprefix("torch.") not in op:
        pytest.skip(f"the native op did not load for {dtype} on this CPU")


def _inputs(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, q_len: int, head_len: int = 37
) -> tuple[torch.Tensor, ...]:
    """Three rows: a full one, one whose head is left-padded by 5 keys and whose last third of
    queries is padding, one with its head left-padded by 70 (whole key tiles, where the head is that
    long) and a single real query."""
    gen = torch.Generator().manual_seed(q_len + dim)
    rows = 3
    q = torch.randn(rows, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(rows, kv_heads, head_len + q_len, dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, head_len + q_len, dim, generator=gen).to(dtype)
    first = torch.tensor([0, min(5, head_len), min(70, head_len)])
    lens = torch.tensor([q_len, max(1, q_len - q_len // 3), 1])
    return q, k, v, first, lens


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    """grouped_attention with the mask ``first`` stands for, the real queries packed."""
    q_len = q.shape[2]
    mask = native.visible_mask(first, q_len, k.shape[2])
    out = grouped_attention(q, k, v, mask, 0.25)  # [rows, q, heads, dim]
    return out.flatten(0, 1)[native.real_slots(lens, q_len)]


SHAPES = [  # (heads, kv_heads, dim, q_len, head_len)
    (4, 2, 16, 2 * 64 + 45, 37),  # eleven query tiles, the last of 13; 210 keys: a partial key tile
    (4, 2, 16, 1, 37),  # one query per row
    (16, 8, 128, 70, 37),  # the real model's heads
    (2, 2, 16, 64, 37),  # no grouping, four full query tiles, 101 keys
    (4, 2, 16, 90, 150),  # a head past two key tiles, one row's padded by 70 (a whole tile)
    (4, 2, 16, 40, 0),  # a head forward: no head, causal from the first key
]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "q_len", "head_len"), SHAPES)
def test_fp32_equals_fp64_within_1e_5(
    op: frozenset[str], heads: int, kv_heads: int, dim: int, q_len: int, head_len: int
) -> None:
    _need(op, torch.float32)
    q, k, v, first, lens = _inputs(torch.float32, heads, kv_heads, dim, q_len, head_len)
    want = _reference(q.double(), k.double(), v.double(), first, lens)
    got = native.native_attention(q, k, v, first, lens, 0.25)
    assert got.dtype == torch.float32 and got.shape == want.shape == (int(lens.sum()), heads, dim)
    assert (got.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "q_len", "head_len"), SHAPES)
def test_bf16_no_farther_from_fp64_than_the_torch_path(
    op: frozenset[str], heads: int, kv_heads: int, dim: int, q_len: int, head_len: int
) -> None:
    _need(op, torch.bfloat16)
    q, k, v, first, lens = _inputs(torch.bfloat16, heads, kv_heads, dim, q_len, head_len)
    exact = _reference(q.double(), k.double(), v.double(), first, lens)
    torch_path = _reference(q.float(), k.float(), v, first, lens)
    got = native.native_attention(q, k, v, first, lens, 0.25)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    err, ref_err = ((x.double() - exact).abs().max().item() for x in (got, torch_path))
    assert ref_err > 0 and err <= 1.25 * ref_err, (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padding_queries_do_not_touch_real_ones(op: frozenset[str], dtype: torch.dtype) -> None:
    _need(op, dtype)
    q, k, v, first, lens = _inputs(dtype, 4, 2, 16, 90)
    noisy = q.clone()
    for row, n in enumerate(lens.tolist()):
        noisy[row, :, n:] = float("nan")  # a padding query's values: never read
    assert torch.equal(
        native.native_attention(q, k, v, first, lens, 0.25),
        native.native_attention(noisy, k, v, first, lens, 0.25),
    )


@pytest.mark.parametrize(
    ("first", "lens", "message"),
    [
        ([0, 0, 38], [5, 5, 5], "first <= the head's keys"),
        ([0, -1, 0], [5, 5, 5], "first <= the head's keys"),
        ([0, 0, 0], [5, 91, 5], "lens <= queries"),
        ([0, 0], [5, 5], "first and lens per row"),
    ],
)
def test_bad_rows_are_refused(
    op: frozenset[str], first: list[int], lens: list[int], message: str
) -> None:
    _need(op, torch.float32)
    q, k, v, *_ = _inputs(torch.float32, 4, 2, 16, 90)
    with pytest.raises(RuntimeError, match=message):
        native.native_attention(q, k, v, torch.tensor(first), torch.tensor(lens), 0.25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("head_len", "q_len"), [(37, 90), (64, 64), (0, 20), (80, 1)])
def test_a_head_given_apart_equals_its_concatenation(
    op: frozenset[str], dtype: torch.dtype, head_len: int, q_len: int
) -> None:
    """As the padded plan's tails call it: one head's K/V expanded over the rows (stride 0), this
    forward's K/V a transposed view; head + tail lengths on and off the 64-key tiles."""
    _need(op, dtype)
    gen = torch.Generator().manual_seed(head_len + q_len)
    rows, heads, kv_heads, dim = 3, 4, 2, 16
    q = torch.randn(rows, heads, q_len, dim, generator=gen).to(dtype)
    head_k, head_v = (torch.randn(kv_heads, head_len, dim, generator=gen).to(dtype) for _ in "kv")
    # [rows, width, kv_heads, dim] transposed: the dim contiguous, the rest strided
    new_k, new_v = (
        torch.randn(rows, q_len, kv_heads, dim, generator=gen).to(dtype).transpose(1, 2)
        for _ in "kv"
    )
    past = (head_k.expand(rows, -1, -1, -1), head_v.expand(rows, -1, -1, -1))
    first = torch.tensor([0, min(5, head_len), min(20, head_len)])
    lens = torch.tensor([q_len, q_len, max(1, q_len // 2)])
    whole_k, whole_v = (torch.cat((p, n), dim=2) for p, n in zip(past, (new_k, new_v), strict=True))
    for values, whole, new, prior in (
        (False, whole_k, new_k, past[0]),
        (True, whole_v, new_v, past[1]),
    ):
        assert torch.equal(
            native.pack(new, prior, values=values), native.pack(whole, values=values)
        )
    got = native.native_attention(q, new_k, new_v, first, lens, 0.25, past)
    assert torch.equal(got, native.native_attention(q, whole_k, whole_v, first, lens, 0.25))


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 1e-2), ("float32", 1e-6)])
def test_engine_uses_it_and_scores_as_without(
    op: frozenset[str], tmp_path: Path, dtype: str, tol: float
) -> None:
    _need(op, getattr(torch, dtype))
    model = build_tiny_reranker(tmp_path / "m", "bpe", num_layers=3)

    def engine(native_attention: bool) -> HFEngine:
        e = HFEngine(str(model), device="cpu", dtype=dtype, plan="padded", compile="on")
        e.load()
        assert e.describe()["attention"] == "grouped-native"
        e._fused.attend.native = native_attention
        return e

    with_op, without = engine(True), engine(False)
    # bf16: the same numbers up to where a probability rounds to bf16 the other way
    assert _max_diff(with_op.score_requests(REQUESTS), without.score_requests(REQUESTS)) <= tol


def test_engine_keeps_torch_attention_where_it_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused.compiler_available():
        pytest.skip("no C++ compiler: compile=on is refused")
    monkeypatch.setattr(native, "dtypes", frozenset)
    model = build_tiny_reranker(tmp_path / "m", "bpe", num_layers=2)
    e = HFEngine(str(model), device="cpu", dtype="bfloat16", plan="padded", compile="on")
    e.load()
    assert e.describe()["attention"] == "grouped" and not e._fused.attend.native


def test_the_first_build_runs_while_the_model_loads(
    op: frozenset[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine compiles the op (~10 s) in the background from the start of load(), and the
    fused decoder waits for it before loading it."""
    import threading

    calls: list[str] = []
    built = threading.Event()

    def build(cc: str, isa: list[str]) -> Path:
        calls.append(threading.current_thread().name)
        built.set()
        return Path("/nonexistent")

    monkeypatch.setattr(native, "_loaded", lambda: False)
    monkeypatch.setattr(native, "build", build)
    model = build_tiny_reranker(tmp_path / "m", "bpe", num_layers=2)
    e = HFEngine(str(model), device="cpu", dtype="float32", plan="padded", compile="on")
    e.load()
    assert calls and calls[0].startswith("winnow-build") and built.is_set()
    assert e._op_build is not None and e._op_build.done()
    off = HFEngine(str(model), device="cpu", dtype="float32", plan="padded", compile="off")
    off.load()
    assert off._op_build is None and len(calls) == 1  # nothing to compile: nothing built


def test_a_broken_build_raises_with_the_compilers_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused.compiler_available():
        pytest.skip("no C++ compiler")
    bad = tmp_path / "attention.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(subprocess.CalledProcessError) as err:
        native.build(native._compiler() or "g++", native.ISA_FLAGS["AVX2"])
    assert "error" in err.value.stderr
    assert not any((tmp_path / "cache" / "winnow").glob("*.so"))  # nothing half-written kept


@pytest.mark.slow
def test_build_is_cached_by_source(op: frozenset[str], tmp_path: Path, monkeypatch: Any) -> None:
    """The same source, torch, compiler and flags reuse the library on disk; a new source builds."""
    cc, isa = native._compiler(), native.ISA_FLAGS[torch.backends.cpu.get_cpu_capability()]
    assert cc is not None
    first = native.build(cc, isa)
    assert native.build(cc, isa) == first and first.exists()
    src = tmp_path / "attention.cpp"
    src.write_text(native.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", src)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    second = native.build(cc, isa)
    assert second != first and second.exists()
