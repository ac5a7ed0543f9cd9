"""HFEngine returns the model card's scores (fp32 |Δ| ≤ 1e-4), faster, across requests and batchings.

The card's reference code is kept here verbatim in logic (format_instruction, process_inputs,
compute_logits). Tiny random Qwen3 checkpoints are built per tokenizer: the real Qwen tokenizer when the
shared files exist (skipped otherwise) and a byte-level BPE built in code (always).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_qwen import build_tiny_reranker, real_tokenizer_available
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.rerank import RerankRequest
from pipeline.rerank.hf import (
    ATTENTION_CHUNK_CPU,
    ATTENTION_NAME,
    HFEngine,
    _chunked_sdpa,
    resolve_dtype,
)

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


class CardReference:
    """The Qwen3-Reranker model card's transformers code."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
            'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
            "<|im_start|>user\n"
        )
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction: str | None, query: str, doc: str) -> str:
        if instruction is None:
            instruction = (
                "Given a web search query, retrieve relevant passages that answer the query"
            )
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs: list[str], max_length: int) -> Any:
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(inputs, padding=True, return_tensors="pt")

    @torch.no_grad()
    def compute_logits(self, inputs: Any) -> list[float]:
        # logits_to_keep=1: the card projects every position onto the vocabulary and then keeps the
        # last one; projecting only the last is the same number and avoids 8192 x 151669 floats.
        batch_scores = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def score(
        self, query: str, docs: list[str], instruction: str | None = None, max_length: int = 8192
    ) -> list[float]:
        pairs = [self.format_instruction(instruction, query, d) for d in docs]
        return self.compute_logits(self.process_inputs(pairs, max_length))


def _kinds() -> list[Any]:
    real = pytest.param(
        "real",
        marks=pytest.mark.skipif(
            not real_tokenizer_available(), reason="shared Qwen tokenizer files absent"
        ),
    )
    return ["bpe", real]


@pytest.fixture(scope="module", params=_kinds())
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_tiny_reranker(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    engine = HFEngine(str(path), device="cpu", dtype="float32")
    engine.load()
    return path, engine, CardReference(path)


def _assert_close(got: list[float], want: list[float], tol: float = TOL) -> None:
    assert len(got) == len(want)
    diff = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    assert diff <= tol, (diff, got, want)


def test_constructor_is_cheap_and_lazy() -> None:
    engine = HFEngine("/does/not/exist", max_batch_tokens=1024)
    assert not engine.loaded
    assert engine.max_batch_tokens == 1024
    assert engine.pairs_scored == 0


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
        before = engine.forward_passes
        got = engine.score(query, docs)
        assert engine.forward_passes - before >= len(docs)
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
    assert engine.last_batch_requests == len(reqs)
    assert engine.last_batch_pairs == sum(len(r.docs) for r in reqs)
    assert engine.last_batch_forwards == 2  # one for the 3 unique heads, one for all 19 tails
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
    docs = [d * k for d in DOCS[:4] for k in (1, 3, 9)] + [DOCS[9]]
    saved = engine.max_batch_tokens, engine.min_fill
    engine.max_batch_tokens, engine.min_fill = 1 << 20, 32
    try:
        pairs, heads, _ = engine._tokenize([RerankRequest("gravity", docs)])
        batches = engine._cut_batches(pairs, heads)
        assert len(batches) > 1
        assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in pairs)
        for b in batches:
            padded = len(b) * max(len(p.tail) for p in b)
            real = sum(len(p.tail) for p in b)
            assert len(b) == 1 or padded <= max(32, 1.1 * real), (padded, real)
        got = engine.score("gravity", docs)
    finally:
        engine.max_batch_tokens, engine.min_fill = saved
    _assert_close(got, ref.score("gravity", docs))


def test_chunked_attention_is_installed(setup: Any) -> None:
    _, engine, _ = setup
    assert engine.chunked_attention
    assert engine._decoder.config._attn_implementation == ATTENTION_NAME


@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_sdpa_equals_masked_sdpa(groups: int) -> None:
    """Chunked attention = one masked SDPA call, for a left-padded head + causal, right-padded tail."""
    torch.manual_seed(0)
    rows, heads, dim, head_len, q_len = 3, 4, 16, 37, ATTENTION_CHUNK_CPU * 2 + 45
    query = torch.randn(rows, heads, q_len, dim)
    key = torch.randn(rows, heads // groups, head_len + q_len, dim)
    value = torch.randn_like(key)
    head_valid = torch.arange(head_len)[None, :] >= torch.tensor([0, 5, 20])[:, None]
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    mask = torch.cat(
        [head_valid[:, None, :].expand(rows, q_len, -1), causal[None].expand(rows, -1, -1)], -1
    )[:, None]
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    got, _ = _chunked_sdpa(module, query, key, value, mask, scaling=0.25)
    rep = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, *rep, attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("max_length", [64, 100])
def test_truncation_keeps_suffix(setup: Any, max_length: int) -> None:
    _, engine, ref = setup
    saved = engine.max_length
    engine.max_length = max_length
    try:
        reqs = [
            RerankRequest("short query", DOCS),
            RerankRequest("a very long query that does not fit " * 10, DOCS[:3]),
        ]
        pairs, heads, _ = engine._tokenize(reqs)
        for p in pairs:
            assert p.tail[-len(engine.suffix_ids) :] == engine.suffix_ids
            assert len(heads[p.head].ids) + len(p.tail) <= max_length
        got = engine.score_requests(reqs)
    finally:
        engine.max_length = saved
    for r, g in zip(reqs, got, strict=True):
        _assert_close(g, ref.score(r.query, list(r.docs), max_length=max_length))


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
    before = engine.stats()
    engine.score("q", ["a", "b", "c"])
    after = engine.stats()
    assert after["pairs_scored"] - before["pairs_scored"] == 3
    assert after["batches"] - before["batches"] == 1
    assert after["forward_passes"] > before["forward_passes"]
    assert after["tokens_scored"] > before["tokens_scored"]
    assert after["padded_tokens"] >= after["tokens_scored"]
    assert after["last_batch_pairs"] == 3
    assert all(isinstance(v, int) for k, v in after.items() if k != "last_batch_seconds")


def test_bf16_close_to_card_bf16(tmp_path: Path) -> None:
    path = build_tiny_reranker(tmp_path / "m", "bpe")
    engine = HFEngine(str(path), device="cpu", dtype="bfloat16")
    engine.load()
    assert engine.dtype == "bfloat16"
    ref = CardReference(path, torch.bfloat16)
    _assert_close(engine.score("capital", DOCS[:6]), ref.score("capital", DOCS[:6]), 3e-2)


def test_resolve_dtype() -> None:
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")
