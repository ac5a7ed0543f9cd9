"""Planning (pipeline/rerank/backends/hf/plan.py) without a model: the card's tokens, heads, batches, packed layout."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.rerank.backends.hf.plan import cut_packed, cut_padded, pack, tokenize
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.prompt import PREFIX, SUFFIX, PromptTooLong, format_pair
from testkit.tiny_qwen import build_bpe_tokenizer

DOCS = ["The capital of China is Beijing.", "", "Gravity " * 40, "no", "x" * 120, "北京"]


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_bpe_tokenizer()


def _fixed(tok: Any) -> tuple[list[int], list[int]]:
    return tok.encode(PREFIX, add_special_tokens=False), tok.encode(
        SUFFIX, add_special_tokens=False
    )


def _requests() -> list[RerankRequest]:
    return [
        RerankRequest("capital of China", DOCS),
        RerankRequest("gravity", DOCS[::-1], "Retrieve physics passages"),
        RerankRequest("capital of China", DOCS[:3]),  # same head as the first
        RerankRequest("empty", []),
    ]


def test_head_plus_tail_is_the_cards_sequence(tok: Any) -> None:
    prefix, suffix = _fixed(tok)
    reqs = _requests()
    plan = tokenize(tok, reqs, prefix, suffix, 8192)
    assert len(plan.heads) == 2  # requests 0 and 2 share one head
    assert len(plan.pairs) == sum(len(r.docs) for r in reqs)
    total = 0
    for p in plan.pairs:
        r = reqs[p.req]
        want = tok.encode(
            format_pair(r.query, r.docs[p.doc], r.instruction), add_special_tokens=False
        )
        assert plan.heads[p.head] + p.tail == want
        total += len(want)
    assert plan.reference_tokens == total


def test_truncation_cuts_documents_only(tok: Any) -> None:
    prefix, suffix = _fixed(tok)
    plan = tokenize(tok, [RerankRequest("capital", DOCS)], prefix, suffix, 120)
    for p in plan.pairs:
        assert len(plan.heads[p.head]) + len(p.tail) <= 120
        assert p.tail[-len(suffix) :] == suffix
    assert max(len(plan.heads[p.head]) + len(p.tail) for p in plan.pairs) == 120


def test_oversized_head_raises(tok: Any) -> None:
    prefix, suffix = _fixed(tok)
    with pytest.raises(PromptTooLong):
        tokenize(tok, [RerankRequest("long query " * 30, DOCS)], prefix, suffix, 120)


@pytest.mark.parametrize("budget", [1, 150, 400, 1 << 20])
def test_cut_packed_respects_budget(tok: Any, budget: int) -> None:
    prefix, suffix = _fixed(tok)
    plan = tokenize(tok, _requests(), prefix, suffix, 8192)
    batches = cut_packed(plan.pairs, plan.heads, budget)
    assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in plan.pairs)
    for b in batches:
        layout = pack(b, plan.heads)
        heads = {p.head for p in b}
        assert layout.tokens == sum(len(p.tail) for p in b) + sum(len(plan.heads[h]) for h in heads)
        assert len(b) == 1 or layout.tokens <= budget
    if budget >= 1 << 20:
        assert len(batches) == 1


def test_cut_padded_counts_padding(tok: Any) -> None:
    prefix, suffix = _fixed(tok)
    plan = tokenize(tok, _requests(), prefix, suffix, 8192)
    for b in cut_padded(plan.pairs, plan.heads, 300, 32, 0.1):
        width = max(len(plan.heads[p.head]) for p in b) + max(len(p.tail) for p in b)
        assert len(b) == 1 or len(b) * width <= 300


def test_pack_layout(tok: Any) -> None:
    prefix, suffix = _fixed(tok)
    plan = tokenize(tok, _requests(), prefix, suffix, 8192)
    layout = pack(plan.pairs, plan.heads)
    assert layout.head_tokens == sum(len(h) for h in plan.heads)  # each distinct head once
    assert layout.rows == len(plan.heads) + len(plan.pairs)
    assert sum(layout.q_len) == layout.tokens  # rows tile the stream
    for r in range(layout.rows):
        assert layout.q_start[r] == sum(layout.q_len[:r])
    for j, p in enumerate(layout.pairs):
        head = plan.heads[p.head]
        start = layout.last[j] - len(p.tail) + 1
        assert layout.ids[start : layout.last[j] + 1] == p.tail
        r = layout.q_start.index(start)
        hs = layout.pre_start[r]
        assert layout.pre_len[r] == len(head) and layout.ids[hs : hs + len(head)] == head
    assert layout.max_q == max(layout.q_len)
