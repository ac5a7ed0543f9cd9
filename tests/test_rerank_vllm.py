"""vLLM backend: VLLMEngine behind the micro-batcher, driven by a fake ``LLM`` that records its calls.

The fake stands in for ``vllm.LLM`` only (allowed by issue 10); the tokenizer it hands out is real (the
Qwen3 tokenizer from ../shared/models when present, else the Qwen-style BPE built in tiny_qwen), and it
tokenizes the prompts the way vLLM 0.32 does for a cross-encoder without a separator token: the
rendered ``query side + document side`` string in one tokenizer call. One ``gpu`` test runs the real thing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pytest

from pipeline.rerank.backends.vllm import (
    CONCAT_TEMPLATE,
    HF_OVERRIDES,
    VLLMEngine,
    build_score_inputs,
    extract_scores,
    llm_kwargs,
)
from pipeline.rerank.base import Reranker, RerankRequest
from pipeline.rerank.batcher import BatchedReranker, MicroBatcher, Overloaded
from pipeline.rerank.cache import unwrap
from pipeline.rerank.factory import build_reranker
from pipeline.rerank.prompt import (
    SUFFIX,
    PromptTooLong,
    body_budget,
    encode_fixed,
    format_body,
    format_document,
    format_pair,
    format_query,
)
from testkit.tiny_qwen import build_bpe_tokenizer, load_real_tokenizer, real_tokenizer_available

needs_real_tokenizer = pytest.mark.skipif(
    not real_tokenizer_available(), reason="real Qwen3 tokenizer not in ../shared/models"
)


@dataclass
class _Inner:
    score: float


@dataclass
class _Out:
    outputs: _Inner
    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None


def fake_score(prompt: str) -> float:
    """A deterministic score of the whole prompt, so order and pairing mistakes show."""
    return (sum(prompt.encode()) % 997) / 997


class FakeLLM:
    """Records ``score`` calls; renders like vLLM (template or concatenation) and tokenizes once."""

    def __init__(self, tokenizer: Any, gate: threading.Event | None = None) -> None:
        self.tokenizer = tokenizer
        self.calls: list[dict[str, Any]] = []
        self.gate = gate
        self.started = threading.Event()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def score(
        self,
        data_1: list[str],
        data_2: list[str],
        /,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
    ) -> list[_Out]:
        assert isinstance(data_1, list) and isinstance(data_2, list)
        assert len(data_1) == len(data_2), "paired lists"
        self.calls.append({"data_1": data_1, "data_2": data_2, "chat_template": chat_template})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        outs = []
        for q, d in zip(data_1, data_2, strict=True):
            if chat_template is not None:
                messages = [{"role": "query", "content": q}, {"role": "document", "content": d}]
                prompt = jinja2.Environment().from_string(chat_template).render(messages=messages)
            else:
                prompt = q + d
            ids = self.tokenizer(prompt)["input_ids"]
            outs.append(_Out(_Inner(fake_score(prompt)), prompt_token_ids=ids))
        return outs


@pytest.fixture(scope="module")
def bpe() -> Any:
    return build_bpe_tokenizer()


def make_engine(
    tokenizer: Any, max_model_len: int = 8192, **fake_kw: Any
) -> tuple[VLLMEngine, FakeLLM]:
    fake = FakeLLM(tokenizer, **fake_kw)
    engine = VLLMEngine("fake/model", max_model_len=max_model_len)
    engine.attach(fake)
    return engine, fake


def card_ids(tok: Any, query: str, doc: str, instruction: str | None, max_length: int) -> list[int]:
    """The model card's token ids for one pair: body cut to the budget, prefix/suffix around it."""
    prefix, suffix = encode_fixed(tok)
    budget = body_budget(max_length, prefix, suffix)
    body = tok(
        [format_body(query, doc, instruction)], truncation="longest_first", max_length=budget
    )
    return prefix + body["input_ids"][0] + suffix


# --- formatting ----------------------------------------------------------------------------------
def test_score_inputs_concatenate_to_card_prompt() -> None:
    q, docs = build_score_inputs("what?", ["a", "", "北京"], "custom")
    assert [q + d for d in docs] == [format_pair("what?", d, "custom") for d in ["a", "", "北京"]]


def test_concat_template_renders_full_prompt() -> None:
    q, docs = build_score_inputs("q {x}", ["d\n\n"])
    messages = [{"role": "query", "content": q}, {"role": "document", "content": docs[0]}]
    rendered = jinja2.Environment().from_string(CONCAT_TEMPLATE).render(messages=messages)
    assert rendered == format_pair("q {x}", "d\n\n")


def test_extract_scores_in_order_and_errors() -> None:
    assert extract_scores([_Out(_Inner(0.25)), _Out(_Inner(0.75))], 2) == [0.25, 0.75]
    with pytest.raises(RuntimeError):
        extract_scores([_Out(_Inner(0.5))], 2)
    with pytest.raises(RuntimeError, match="failed"):
        extract_scores([_Out(_Inner(0.0), error="too long")], 1)


def test_llm_kwargs() -> None:
    kw = llm_kwargs("m", gpu_memory_utilization=0.4, max_model_len=4096)
    assert kw["runner"] == "pooling"
    assert kw["hf_overrides"] == HF_OVERRIDES
    assert HF_OVERRIDES["classifier_from_token"] == ["no", "yes"]
    assert kw["enable_prefix_caching"] is True
    assert kw["gpu_memory_utilization"] == 0.4
    assert kw["max_model_len"] == 4096


def test_build_reranker_vllm_is_batched_and_lazy() -> None:
    from pipeline.config import Settings

    r = unwrap(build_reranker(Settings(rerank_backend="vllm", rerank_max_length=4096).reranker))
    assert isinstance(r, Reranker) and isinstance(r, BatchedReranker)
    assert isinstance(r.engine, VLLMEngine) and not r.engine.loaded
    assert (r.backend, r.engine.max_length) == ("vllm", 4096)
    assert r.batcher.slice_tokens == r.engine.max_batch_tokens


def test_missing_vllm_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"winnow\[gpu\]"):
        VLLMEngine("m").load()


# --- merging -------------------------------------------------------------------------------------
def test_concurrent_requests_become_one_score_call(bpe: Any) -> None:
    engine, fake = make_engine(bpe)
    r = BatchedReranker(engine, "m", MicroBatcher(engine, max_wait_ms=20))
    docs_a = ["The capital of China is Beijing.", "", "Gravity is a force."]
    docs_b = ["yes no", "北京 is a city"]

    async def go() -> list[list[float]]:
        return list(
            await asyncio.gather(
                r.score("capital?", docs_a, "custom instruction"), r.score("what is yes?", docs_b)
            )
        )

    got_a, got_b = asyncio.run(go())
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert (
        call["data_1"]
        == [format_query("capital?", "custom instruction")] * 3 + [format_query("what is yes?")] * 2
    )
    assert call["data_2"] == [format_document(d) for d in docs_a + docs_b]
    assert call["chat_template"] == CONCAT_TEMPLATE
    assert got_a == [fake_score(format_pair("capital?", d, "custom instruction")) for d in docs_a]
    assert got_b == [fake_score(format_pair("what is yes?", d)) for d in docs_b]
    st = r.stats()
    assert st["rerank_requests"] == 2 and st["rerank_dispatches"] == 1
    assert st["rerank_merged_dispatches"] == 1 and st["rerank_pairs"] == 5
    assert st["rerank_forward_passes"] == 1 and st["rerank_tokens"] > 0
    assert st["last_dispatch_pairs"] == 5 and st["queue_depth"] == 0
    asyncio.run(r.aclose())


def test_uncut_prompts_tokenize_like_the_card(bpe: Any) -> None:
    toks = [bpe] + ([load_real_tokenizer()] if real_tokenizer_available() else [])
    docs = [
        "plain text",
        "",
        "trailing spaces and newline  \n",
        "  leading spaces",
        "\nleading newline",
        "北京是中国的首都。",
        "emoji 🙂 and accents café",
        "a literal <|im_end|> inside",
        "ends with a colon:",
    ]
    for tok in toks:
        engine, fake = make_engine(tok)
        engine.score_requests([req("query?", docs, "inst")])
        for ids, d in zip(fake_ids(fake), docs, strict=True):
            assert ids == card_ids(tok, "query?", d, "inst", 8192), repr(d)


def req(query: str, docs: list[str], instruction: str | None = None) -> RerankRequest:
    return RerankRequest(query, docs, instruction)


def fake_ids(fake: FakeLLM) -> list[list[int]]:
    """Prompt token ids of the last call, as vLLM would tokenize the rendered prompts."""
    call = fake.calls[-1]
    return [
        fake.tokenizer(q + d)["input_ids"]
        for q, d in zip(call["data_1"], call["data_2"], strict=True)
    ]


@needs_real_tokenizer
def test_long_documents_cut_keeping_the_suffix() -> None:
    tok = load_real_tokenizer()
    max_len = 160
    engine, fake = make_engine(tok, max_model_len=max_len)
    prefix, suffix = encode_fixed(tok)
    ascii_doc = " ".join(f"word{i} alpha beta" for i in range(200))
    cjk_doc = "北京是中华人民共和国的首都，" * 40
    emoji_doc = "🙂🚀 " * 120
    short = "short document"
    engine.score_requests([req("capital of China?", [ascii_doc, short, cjk_doc, emoji_doc])])
    sent = fake.calls[-1]["data_2"]
    for ids, doc, side in zip(
        fake_ids(fake), [ascii_doc, short, cjk_doc, emoji_doc], sent, strict=True
    ):
        want = card_ids(tok, "capital of China?", doc, None, max_len)
        assert ids[: len(prefix)] == prefix and ids[-len(suffix) :] == suffix  # suffix kept
        assert len(ids) <= max_len
        assert side.startswith("<Document>: ")
        sent_doc = side[len("<Document>: ") : len(side) - len(SUFFIX)]
        assert doc.startswith(sent_doc)  # the document's head is kept, its tail cut
        if doc in (ascii_doc, short):
            assert ids == want  # exactly the card's tokens
        else:  # a cut inside a multi-byte character can only drop its byte tokens
            body, want_body = ids[len(prefix) : -len(suffix)], want[len(prefix) : -len(suffix)]
            assert want_body[: len(body)] == body and len(want_body) - len(body) <= 3
    assert engine.cut_documents == 3
    assert engine.counters.tokens_scored == sum(len(i) for i in fake_ids(fake))


def test_oversized_instruction_fails_alone_not_its_batch(bpe: Any) -> None:
    engine, fake = make_engine(bpe, max_model_len=128)
    r = BatchedReranker(engine, "m", MicroBatcher(engine, max_wait_ms=20))

    async def go() -> list[Any]:
        return list(
            await asyncio.gather(
                r.score("q", ["fine document"]),
                r.score("q", ["doc"], "an instruction " * 200),
                return_exceptions=True,
            )
        )

    ok, bad = asyncio.run(go())
    assert isinstance(bad, PromptTooLong)
    assert ok == [fake_score(format_pair("q", "fine document"))]
    # the merged call failed before reaching vLLM; the good request was re-run alone
    assert [c["data_2"] for c in fake.calls] == [[format_document("fine document")]]
    assert r.stats()["rerank_failed"] == 1
    asyncio.run(r.aclose())


def test_full_queue_answers_overloaded(bpe: Any) -> None:
    gate = threading.Event()
    engine, fake = make_engine(bpe, gate=gate)
    r = BatchedReranker(engine, "m", MicroBatcher(engine, queue_size=1, max_wait_ms=0))

    async def go() -> tuple[list[float], BaseException]:
        first = asyncio.ensure_future(r.score("q", ["a", "b"]))
        await asyncio.to_thread(fake.started.wait, 30)  # the first request is in the engine
        try:
            await r.score("q2", ["c"])
        except Overloaded as exc:
            refused: BaseException = exc
        gate.set()
        return await first, refused

    got, refused = asyncio.run(go())
    assert isinstance(refused, Overloaded) and refused.retry_after >= 1
    assert len(got) == 2
    st = r.stats()
    assert st["rerank_rejected"] == 1 and st["rerank_requests"] == 1
    assert len(fake.calls) == 1
    asyncio.run(r.aclose())


# --- the real thing --------------------------------------------------------------------------------
@pytest.mark.gpu
def test_vllm_real_backend(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vllm and a CUDA GPU")
    from test_rerank_hf import CardReference

    from testkit.tiny_qwen import build_tiny_reranker

    path = build_tiny_reranker(tmp_path / "m", "auto")
    engine = VLLMEngine(str(path), gpu_memory_utilization=0.3, max_model_len=256, dtype="float32")
    r = BatchedReranker(engine, "tiny", MicroBatcher(engine, max_wait_ms=20))
    r.load()
    docs = ["The capital of China is Beijing.", "", "Gravity is a force. " * 80]
    other = ["Paris is the capital of France.", "北京"]

    async def go() -> list[list[float]]:
        return list(
            await asyncio.gather(r.score("capital of China?", docs), r.score("France?", other))
        )

    got, got_other = asyncio.run(go())
    ref = CardReference(path)
    want = ref.score("capital of China?", docs, max_length=256)
    want_other = ref.score("France?", other, max_length=256)
    assert max(abs(a - b) for a, b in zip(got + got_other, want + want_other, strict=True)) <= 1e-3
    st = r.stats()
    assert st["rerank_merged_dispatches"] >= 1 and engine.cut_documents >= 1
    asyncio.run(r.aclose())
