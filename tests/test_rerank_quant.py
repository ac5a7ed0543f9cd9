"""int8 mode (WINNOW_RERANK_QUANT=int8): real int8 linears, scores close to fp32, refused where it cannot run.

Tolerances were measured on these tiny random Qwen3 rerankers (5 queries × 15 documents, BPE
tokenizer): per-pair |Δ| ≤ 0.022 (mean ≤ 0.007), Kendall τ ≥ 0.98, top-5 kept; the bounds below
leave about 2× headroom and still fail on a broken quantizer (a wrong scale moves scores by ~0.3).
The real architecture and a trained model are measured by bench/quant.py (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_rerank_hf import DOCS as CARD_DOCS

from pipeline.config import Settings
from pipeline.rerank.backends.hf.engine import HFEngine
from pipeline.rerank.backends.hf.quant import (
    QuantUnsupported,
    check_quant,
    int8_linear,
    quantize_decoder,
    quantize_linears,
)
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.factory import build_reranker, pick_backend
from testkit.tiny_qwen import build_tiny_reranker, real_tokenizer_available

MAX_DELTA = 0.05
MEAN_DELTA = 0.015
MIN_TAU = 0.9
QUERIES = [
    "what is the capital of China?",
    "Explain gravity",
    "小鼠",
    "q",
    "which year had ümlauts",
]
DOCS = [
    *CARD_DOCS,  # the card-equality tests' odd documents, then near-duplicates that rank closely
    "The capital of China is Beijing and it is big.",
    "Gravity is a force.",
    "北京",
    "yes no " * 5,
    "Alterations of white matter",
]


def _kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall τ-a over all pairs (ties count as neither)."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += int(torch.sign(torch.tensor((a[i] - a[j]) * (b[i] - b[j]))).item())
    return s / (n * (n - 1) / 2)


def _kinds() -> list[Any]:
    real = pytest.param(
        "real",
        marks=pytest.mark.skipif(
            not real_tokenizer_available(), reason="shared Qwen tokenizer files absent"
        ),
    )
    return ["bpe", real]


@pytest.fixture(scope="module", params=_kinds())
def engines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[HFEngine, HFEngine]:
    model = build_tiny_reranker(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    fp32 = HFEngine(str(model), device="cpu", dtype="float32", plan="padded")
    int8 = HFEngine(str(model), device="cpu", dtype="float32", plan="padded", quant="int8")
    fp32.load()
    int8.load()
    return fp32, int8


# --- the module ---------------------------------------------------------------------------------
def test_int8_linear_is_int8_and_close() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    q = int8_linear(dense)
    assert q.weight_t.dtype == torch.int8 and tuple(q.weight_t.shape) == (64, 48)
    assert q.weight_scale.shape == (1, 48)  # one scale per output channel
    with torch.inference_mode():
        for shape in [(1, 64), (3, 64), (2, 5, 64)]:
            x = torch.randn(*shape)
            want = dense(x)
            got = q(x)
            assert got.shape == want.shape
            # int8 grids: relative error of a 64-long dot product ≈ 1e-2
            assert (got - want).abs().max() <= 0.03 * want.abs().max()
        assert q(torch.randn(4, 64).bfloat16()).dtype == torch.bfloat16


def test_int8_linear_rows_are_independent() -> None:
    """Per-token scales: a row's output is the same whatever rows share its batch (an outlier row
    in the batch does not coarsen the others, as a per-tensor scale would)."""
    torch.manual_seed(1)
    q = int8_linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(6, 32)
    batch = torch.cat([x, 1000 * torch.randn(1, 32)])
    with torch.inference_mode():
        assert torch.equal(q(batch)[:6], q(x))
        assert torch.equal(q(x[2:3]), q(x)[2:3])


def test_quantize_linears_swaps_every_linear() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert quantize_linears(net) == 2
    assert not any(type(m) is torch.nn.Linear for m in net.modules())


def test_siblings_fed_one_tensor_quantize_it_once() -> None:
    """q/k/v-like siblings share one quantization of their common input; the outputs are the ones
    each would compute alone, and nothing is held after the last sibling ran."""
    torch.manual_seed(2)
    parent = torch.nn.Module()
    parent.q, parent.k, parent.o = (torch.nn.Linear(16, 8), torch.nn.Linear(16, 4),
                                    torch.nn.Linear(8, 16))  # fmt: skip
    alone = {n: int8_linear(getattr(parent, n)) for n in ("q", "k")}
    assert quantize_linears(parent) == 3
    assert parent.q.shared is parent.k.shared and parent.o.shared is not parent.q.shared
    x, y = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.inference_mode():
        assert torch.equal(parent.q(x), alone["q"](x))
        assert parent.q.shared.x is x  # kept for k
        assert torch.equal(parent.k(y), alone["k"](y))  # another tensor: quantized afresh
        assert torch.equal(parent.q(x), alone["q"](x))
        assert torch.equal(parent.k(x), alone["k"](x))
        assert parent.q.shared.x is None  # dropped after its last user


# --- the engine ---------------------------------------------------------------------------------
def test_engine_decoder_has_only_int8_linears(engines: tuple[HFEngine, HFEngine]) -> None:
    fp32, int8 = engines
    assert int8.describe()["quant"] == "int8" and fp32.describe()["quant"] == "none"
    mods = list(int8._decoder.modules())
    assert not any(type(m) is torch.nn.Linear for m in mods)
    qs = [m for m in mods if type(m).__name__ == "Int8Linear"]
    layers = int8._decoder.config.num_hidden_layers
    assert len(qs) == 7 * layers  # q k v o gate up down
    assert all(m.weight_t.dtype == torch.int8 for m in qs)
    # the yes/no rows of the LM head stay float32 and equal to the fp32 engine's
    assert int8._head_weight.dtype == torch.float32
    assert torch.equal(int8._head_weight, fp32._head_weight)


def test_engine_int8_scores_close_to_fp32(engines: tuple[HFEngine, HFEngine]) -> None:
    fp32, int8 = engines
    reqs = [RerankRequest(q, DOCS) for q in QUERIES]
    want = fp32.score_requests(reqs)
    got = int8.score_requests(reqs)
    deltas = [abs(a - b) for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True)]
    assert max(deltas) <= MAX_DELTA, max(deltas)
    assert sum(deltas) / len(deltas) <= MEAN_DELTA
    for w, g in zip(want, got, strict=True):
        assert _kendall_tau(w, g) >= MIN_TAU, (w, g)
        top_w = set(sorted(range(len(w)), key=lambda i: -w[i])[:3])
        top_g = set(sorted(range(len(g)), key=lambda i: -g[i])[:5])
        assert top_w <= top_g  # the fp32 top 3 stay in the int8 top 5
    # a pair's score does not depend on its batch-mates (per-token activation scales)
    alone = int8.score(QUERIES[0], DOCS[:1])[0]
    assert abs(alone - got[0][0]) <= 1e-5


def test_int8_auto_dtype_is_float32(tmp_path: Path) -> None:
    """auto means bf16 on CPUs with bf16 units; int8 was measured with fp32 around the GEMMs."""
    model = build_tiny_reranker(tmp_path / "m", "bpe")
    engine = HFEngine(str(model), device="cpu", quant="int8")
    engine.load()
    assert engine.describe()["dtype"] == "float32"
    bf16 = HFEngine(str(model), device="cpu", dtype="bfloat16", quant="int8")
    assert 0.0 <= bf16.score("q", ["The capital of China is Beijing."])[0] <= 1.0


# --- refusals -----------------------------------------------------------------------------------
def test_check_quant_refuses_gpu_and_packed_plan() -> None:
    check_quant("none", "cuda")
    check_quant("int8", "cpu")
    with pytest.raises(QuantUnsupported, match=r"CPU only.*WINNOW_RERANK_DEVICE=cpu"):
        check_quant("int8", "cuda")
    with pytest.raises(QuantUnsupported, match="CPU only"):
        quantize_decoder(torch.nn.Linear(4, 4), "int8", "mps")
    with pytest.raises(QuantUnsupported, match="padded plan"):
        check_quant("int8", "cpu", "packed")
    with pytest.raises(QuantUnsupported, match="unknown quant"):
        check_quant("int4", "cpu")


def test_engine_refuses_int8_on_packed_plan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown quant"):
        HFEngine("unused", quant="int4")
    model = build_tiny_reranker(tmp_path / "m", "bpe")
    engine = HFEngine(str(model), device="cpu", dtype="float32", plan="packed", quant="int8")
    with pytest.raises(QuantUnsupported, match="WINNOW_RERANK_PLAN=auto or padded"):
        engine.load()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rerank_backend": "vllm"}, "the vllm backend quantizes"),
        ({"rerank_backend": "remote"}, "the remote backend quantizes"),
        ({"rerank_device": "cuda"}, "runs on CPU only: set WINNOW_RERANK_DEVICE=cpu"),
        ({"rerank_device": "cuda:1"}, "runs on CPU only"),
        ({"rerank_plan": "packed"}, "runs on the padded plan"),
    ],
)
def test_settings_refuse_int8_where_it_cannot_run(kw: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(rerank_quant="int8", **kw)


def test_settings_pass_int8_to_the_hf_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_RERANK_QUANT", "int8")
    settings = Settings(rerank_device="cpu", rerank_cache_mb=0)
    assert settings.rerank_quant == "int8"
    assert Settings(rerank_device="auto", rerank_quant="int8").rerank_quant == "int8"
    assert pick_backend(settings.reranker) == "hf"
    engine = build_reranker(
        settings.reranker, model_path="unused"
    ).engine  # not loaded: nothing read
    assert isinstance(engine, HFEngine) and engine.quant == "int8"
    with pytest.raises(ValueError):
        Settings(rerank_quant="int4")
