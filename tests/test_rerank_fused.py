"""The padded plan's fused decoder (issue 30 items 2 and 3): the card's numbers, kernels compiled once.

- fp32: compiled and eager kernels within 1e-5 of the model card's code (testkit/card_reference.py),
  across merged requests, instructions, long documents and many small forwards;
- bf16: no farther from the exact (fp32) scores than the card's own bf16 run is;
- each function of :mod:`pipeline.rerank.backends.hf.fused` equals transformers' Qwen3 modules, and
  oneDNN's linears with the SiLU or a product in their epilogue equal the linear and the op after it;
- after the engine's warm-up no request shape recompiles (``error_on_recompile``);
- int8 with compiled (de)quantization equals int8 eager;
- ``compile=on`` without a C++ compiler is refused with what to do; auto then runs eager kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.rerank.backends.hf import fused, native, packed
from pipeline.rerank.backends.hf.engine import HFEngine
from pipeline.rerank.base import RerankRequest
from testkit.card_reference import CardReference
from testkit.tiny_qwen import build_tiny_reranker
from tests.test_rerank_hf import DOCS, LONG

TOL_FP32 = 1e-5
needs_compiler = pytest.mark.skipif(
    not fused.compiler_available(), reason="no C++ compiler: inductor cannot build CPU kernels"
)
REQUESTS = [
    RerankRequest("what is the capital of China?", DOCS),
    RerankRequest("gravity", [DOCS[3], LONG, DOCS[0]], instruction="Find physics passages"),
    RerankRequest("x", DOCS[::-1][:3]),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-fused"), "bpe", num_layers=3)


def _card(model: Path, dtype: Any) -> list[list[float]]:
    card = CardReference(model, dtype=dtype)
    return [card.score(r.query, r.docs, r.instruction) for r in REQUESTS]


@pytest.fixture(scope="module")
def exact(model: Path) -> list[list[float]]:
    return _card(model, torch.float32)


def _engine(model: Path, **kw: Any) -> HFEngine:
    engine = HFEngine(str(model), device="cpu", plan="padded", **kw)
    engine.load()
    return engine


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("cpu_gemm", ["onednn", "torch"])
@pytest.mark.parametrize("compile", [pytest.param("on", marks=needs_compiler), "off"])
def test_fp32_equals_the_card_within_1e_5(
    model: Path, exact: list[list[float]], compile: str, cpu_gemm: str
) -> None:
    engine = _engine(model, dtype="float32", compile=compile, cpu_gemm=cpu_gemm)
    assert engine._fused is not None and engine.compile_mode == compile
    # oneDNN's fp32 linears take the SiLU and the gate × up product in their epilogues
    assert engine._fused.gate_in_epilogue == (cpu_gemm == "onednn")
    native_op = compile == "on" and "float32" in native.dtypes()
    assert engine.describe()["attention"] == ("grouped-native" if native_op else "grouped")
    assert _max_diff(engine.score_requests(REQUESTS), exact) <= TOL_FP32
    # many small forwards: every row count, width and head reuse the budget cut makes
    engine.max_batch_tokens, engine.min_fill = 64, 8
    separate = [engine.score_requests([r])[0] for r in REQUESTS]
    assert _max_diff(separate, exact) <= TOL_FP32
    assert engine.stats().forward_passes > 2 * len(REQUESTS)


@needs_compiler
def test_bf16_no_farther_from_exact_than_the_cards_own_bf16(
    model: Path, exact: list[list[float]]
) -> None:
    card_noise = _max_diff(_card(model, torch.bfloat16), exact)
    engine = _engine(model, dtype="bfloat16", compile="on", cpu_gemm="onednn")
    assert not engine._fused.gate_in_epilogue  # bf16 keeps the compiled SiLU·up kernel
    got = _max_diff(engine.score_requests(REQUESTS), exact)
    assert card_noise > 0  # bf16 does round
    assert got <= 1.5 * card_noise, (got, card_noise)


@needs_compiler
def test_no_request_shape_recompiles_after_warm_up(model: Path) -> None:
    engine = _engine(model, dtype="float32", compile="on")
    texts = [("word " * n).strip() for n in (1, 2, 3, 5, 9, 17, 40, 77, 130)]
    calls = [
        [RerankRequest("q", texts[:1])],
        [RerankRequest("a much longer query about many things", texts)],
        [
            RerankRequest("q1", texts[3:5]),
            RerankRequest("q2", texts[::-1]),
            RerankRequest("q3", [LONG]),
        ],
        [RerankRequest("single", [texts[-1]])],
    ]
    import torch._dynamo

    with torch._dynamo.config.patch(error_on_recompile=True):
        for call in calls:
            engine.score_requests(call)
        engine.max_batch_tokens, engine.min_fill = 64, 8
        for call in calls:
            engine.score_requests(call)


@needs_compiler
def test_int8_compiled_is_as_close_to_fp32_as_int8_eager(
    model: Path, exact: list[list[float]]
) -> None:
    """The same quantization: a code may round the other way at a tie (|Δ| ~1e-3 seen), no more."""
    eager = _engine(model, dtype="float32", quant="int8", compile="off").score_requests(REQUESTS)
    compiled = _engine(model, dtype="float32", quant="int8", compile="on").score_requests(REQUESTS)
    int8_error = _max_diff(eager, exact)
    assert _max_diff(compiled, eager) <= 0.5 * int8_error, (_max_diff(compiled, eager), int8_error)
    assert _max_diff(compiled, exact) <= 1.5 * int8_error


def test_compile_on_without_a_compiler_is_refused(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused.shutil, "which", lambda _name: None)
    with pytest.raises(ValueError, match=r"C\+\+ compiler.*WINNOW_RERANK_COMPILE=auto or off"):
        _engine(model, dtype="float32", compile="on")
    auto = _engine(model, dtype="float32")
    assert auto._fused is not None and auto.compile_mode == "off"


def test_a_model_it_cannot_reproduce_runs_transformers_forward(
    model: Path, exact: list[list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_cfg: Any, what: str) -> None:
        raise packed.UnsupportedModel(f"not for the {what}")

    monkeypatch.setattr(packed, "check_supported", refuse)
    engine = _engine(model, dtype="float32")
    assert engine._fused is None and engine.compile_mode == "off"
    assert _max_diff(engine.score_requests(REQUESTS), exact) <= 1e-4


# --- the functions against transformers' modules --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile", [pytest.param(True, marks=needs_compiler), False])
def test_functions_equal_transformers_modules(dtype: torch.dtype, compile: bool) -> None:
    from transformers.models.qwen3 import modeling_qwen3 as q3

    k = fused.Kernels(compile)
    g = torch.Generator().manual_seed(0)
    rows, width, heads, dim = 3, 7, 4, 16
    x = torch.randn(rows, width, heads * dim, generator=g).to(dtype)
    delta = torch.randn(rows, width, heads * dim, generator=g).to(dtype)
    norm = q3.Qwen3RMSNorm(heads * dim, eps=1e-6).to(dtype)
    head_norm = q3.Qwen3RMSNorm(dim, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        head_norm.weight.uniform_(0.5, 1.5, generator=g)
    angles = torch.randn(rows, width, dim // 2, generator=g)
    cos, sin = (
        torch.cat([angles.cos()] * 2, -1).to(dtype),
        torch.cat([angles.sin()] * 2, -1).to(dtype),
    )
    # eager: bit-equal in both dtypes; compiled: fp32 to rounding, bf16 within 2 ulps (it rounds
    # once per kernel, transformers once per op)
    tol = {"rtol": 0.0, "atol": 0.0}
    if compile:
        tol = (
            {"rtol": 1e-6, "atol": 1e-6}
            if dtype == torch.float32
            else {"rtol": 1.6e-2, "atol": 1e-2}
        )

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, **tol)

    with torch.inference_mode():
        close(k.rms(x, norm.weight, 1e-6), norm(x))
        total, normed = k.add_rms(x, delta, norm.weight, 1e-6)
        close(total, x + delta)
        close(normed, norm(x + delta))
        want = head_norm(x.view(rows, width, heads, dim)).transpose(1, 2)
        want, _ = q3.apply_rotary_pos_emb(want, want, cos, sin)
        # the projections come packed, in any order: ``slots`` says which token each padded slot reads
        order = torch.randperm(rows * width, generator=g)
        packed, slots = x.flatten(0, 1)[order], torch.argsort(order).view(rows, width)
        close(k.norm_rope(packed, slots, head_norm.weight, cos, sin, 1e-6), want)
        close(k.split_heads(packed, slots, dim), x.view(rows, width, heads, dim).transpose(1, 2))
        close(k.silu_mul(x, delta), torch.nn.functional.silu(x) * delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_epilogues_equal_the_linear_then_the_op(dtype: torch.dtype) -> None:
    from pipeline.rerank.backends.hf.linear import gate_in_epilogue, onednn_linear

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.nn.Linear(64, 96, bias=False).to(dtype) for _ in range(2))
    x = torch.randn(37, 64, generator=g).to(dtype)
    other = torch.randn(37, 96, generator=g).to(dtype)
    dgate, dup = onednn_linear(gate), onednn_linear(up)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    with torch.inference_mode():
        torch.testing.assert_close(dgate.silu(x), torch.nn.functional.silu(gate(x)), **tol)
        torch.testing.assert_close(dup.times(x, other), up(x) * other, **tol)
        torch.testing.assert_close(
            dup.times(x, dgate.silu(x)), torch.nn.functional.silu(gate(x)) * up(x), **tol
        )
    # fp32 oneDNN linears only: bf16 measured no faster that way; torch's linears have no epilogue
    assert gate_in_epilogue(dgate, dup) == (dtype == torch.float32)
    assert not gate_in_epilogue(gate, up) and not gate_in_epilogue(dgate, up)


def test_head_cache_reuses_a_requests_head_across_calls(
    model: Path, exact: list[list[float]]
) -> None:
    """A request sent in two calls (the batcher's slices) runs its head once: the second call takes
    its K/V from the head cache, with the same scores as one call and as the card."""
    engine = _engine(model, dtype="float32", compile="off")
    req = REQUESTS[0]
    whole = engine.score_requests([req])[0]
    st = engine.stats()
    assert st.head_cache_hits == 0 and len(engine._heads) == 1
    tokens = st.tokens_scored
    first = engine.score_requests([RerankRequest(req.query, req.docs[:2], req.instruction)])[0]
    rest = engine.score_requests([RerankRequest(req.query, req.docs[2:], req.instruction)])[0]
    assert engine.stats().head_cache_hits == 2
    assert _max_diff([first + rest], [whole]) <= 1e-6  # other batches, the same K/V
    assert _max_diff([first + rest], exact[:1]) <= TOL_FP32
    head = len(engine.tokenize([req]).heads[0])
    assert engine.stats().tokens_scored - tokens == tokens - head  # the head did not run again
    engine.reset_head_cache()  # benchmarks start each phase cold: the head runs again
    assert len(engine._heads) == 0
    again = engine.score_requests([req])[0]
    assert engine.stats().head_cache_hits == 2 and len(engine._heads) == 1
    assert _max_diff([again], [whole]) <= 1e-6


def test_head_cache_is_bounded_in_bytes() -> None:
    from pipeline.rerank.backends.hf.padded import HeadCache

    def layers(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(2, n, 4), torch.zeros(2, n, 4)) for _ in range(3)]  # 192·n bytes

    cache = HeadCache(max_bytes=192 * 25)
    cache.put((1,), layers(10))
    cache.put((2,), layers(10))
    assert cache.get((1,)) is not None  # (2,) is now the least recently used
    cache.put((3,), layers(10))  # 30 tokens > 25: the oldest goes
    assert cache.get((2,)) is None and cache.get((1,)) is not None and cache.get((3,)) is not None
    assert cache.bytes == 192 * 20 <= cache.max_bytes
    cache.put((4,), layers(26))  # alone over the bound: not kept, nothing evicted for it
    assert cache.get((4,)) is None and len(cache) == 2
