"""vLLM backend: formatting and output mapping without vLLM; one real run on a GPU (marker ``gpu``)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest

from pipeline.rerank import Reranker
from pipeline.rerank.prompt import format_pair
from pipeline.rerank.vllm import (
    CONCAT_TEMPLATE,
    HF_OVERRIDES,
    VLLMReranker,
    build_score_inputs,
    extract_scores,
    llm_kwargs,
)


def test_score_inputs_concatenate_to_card_prompt() -> None:
    q, docs = build_score_inputs("what?", ["a", "", "北京"], "custom")
    assert [q + d for d in docs] == [format_pair("what?", d, "custom") for d in ["a", "", "北京"]]


def test_concat_template_renders_full_prompt() -> None:
    q, docs = build_score_inputs("q {x}", ["d\n\n"])
    messages = [{"role": "query", "content": q}, {"role": "document", "content": docs[0]}]
    rendered = jinja2.Environment().from_string(CONCAT_TEMPLATE).render(messages=messages)
    assert rendered == format_pair("q {x}", "d\n\n")


@dataclass
class _Inner:
    score: float


@dataclass
class _Out:
    outputs: _Inner


def test_extract_scores_in_order() -> None:
    assert extract_scores([_Out(_Inner(0.25)), _Out(_Inner(0.75))], 2) == [0.25, 0.75]
    with pytest.raises(RuntimeError):
        extract_scores([_Out(_Inner(0.5))], 2)


def test_llm_kwargs() -> None:
    kw = llm_kwargs("m", gpu_memory_utilization=0.4, max_model_len=4096)
    assert kw["runner"] == "pooling"
    assert kw["hf_overrides"] == HF_OVERRIDES
    assert HF_OVERRIDES["classifier_from_token"] == ["no", "yes"]
    assert kw["enable_prefix_caching"] is True
    assert kw["gpu_memory_utilization"] == 0.4
    assert kw["max_model_len"] == 4096


def test_protocol_and_lazy_constructor() -> None:
    r = VLLMReranker("some/model")
    assert isinstance(r, Reranker)
    assert (r.backend, r.model) == ("vllm", "some/model")


def test_missing_vllm_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"winnow\[gpu\]"):
        VLLMReranker("m").load()


def test_score_runs_off_loop_with_fake_llm() -> None:
    calls: list[Any] = []

    class FakeLLM:
        def score(self, q: str, docs: list[str], **kw: Any) -> list[_Out]:
            calls.append((q, docs, kw))
            return [_Out(_Inner(len(d) / 1000)) for d in docs]

    r = VLLMReranker("m")
    r._llm = FakeLLM()
    r._use_template = True

    async def go() -> tuple[list[float], list[float]]:
        return await r.score("q", ["a", "bbb"]), await r.score("q", [])

    got, empty = asyncio.run(go())
    assert empty == []
    assert len(calls) == 1 and calls[0][2]["chat_template"] == CONCAT_TEMPLATE
    assert got == [len(d) / 1000 for d in calls[0][1]]
    assert r.pairs_scored == 2
    asyncio.run(r.aclose())


@pytest.mark.gpu
def test_vllm_real_backend(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vllm and a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_rerank_hf import CardReference
    from tiny_qwen import build_tiny_reranker

    path = build_tiny_reranker(tmp_path / "m", "auto")
    r = VLLMReranker(str(path), gpu_memory_utilization=0.3, max_model_len=2048, dtype="float32")
    r.load()
    docs = ["The capital of China is Beijing.", "", "Gravity is a force."]
    got = asyncio.run(r.score("capital of China?", docs))
    want = CardReference(path).score("capital of China?", docs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-3
    asyncio.run(r.aclose())
