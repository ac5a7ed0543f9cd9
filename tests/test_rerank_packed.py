"""The packed plan's device tensors: positions, mask, gather indices and attention vs a per-pair reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipeline.rerank.backends.hf.attention import build_index, gather_attention
from pipeline.rerank.backends.hf.plan import cut_packed, pack, tokenize
from pipeline.rerank.base import RerankRequest
from pipeline.rerank.prompt import PREFIX, SUFFIX
from testkit.tiny_qwen import build_bpe_tokenizer

DOCS = ["The capital of China is Beijing.", "", "Gravity " * 40, "no", "x" * 120, "北京" * 9]


@pytest.fixture(scope="module")
def layouts() -> list[Any]:
    tok = build_bpe_tokenizer()
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    reqs = [
        RerankRequest("capital of China", DOCS),
        RerankRequest("gravity", DOCS[::-1], "Retrieve physics passages"),
        RerankRequest("capital of China", DOCS[:3]),  # shares the first head
        RerankRequest("a much longer query " * 5, DOCS[1:4]),
    ]
    plan = tokenize(tok, reqs, prefix, suffix, 8192)
    out = [(pack(plan.pairs, plan.heads), plan)]
    out += [(pack(b, plan.heads), plan) for b in cut_packed(plan.pairs, plan.heads, 200)]
    return out


def _expected(layout: Any) -> tuple[list[int], set[tuple[int, int]]]:
    """Card positions per stream token and the (query, key) stream pairs each may attend."""
    pos = [0] * layout.tokens
    allowed: set[tuple[int, int]] = set()
    for r in range(layout.rows):
        qs, ql, ps, pl = layout.q_start[r], layout.q_len[r], layout.pre_start[r], layout.pre_len[r]
        for i in range(ql):
            pos[qs + i] = pl + i
            allowed |= {(qs + i, ps + c) for c in range(pl)}
            allowed |= {(qs + i, qs + c) for c in range(i + 1)}
    return pos, allowed


def test_positions_and_mask_match_the_unpacked_sequences(layouts: list[Any]) -> None:
    for layout, plan in layouts:
        idx = build_index(layout, "cpu", "gather")
        pos, allowed = _expected(layout)
        assert idx.ids.tolist() == layout.ids
        assert idx.positions.tolist() == pos
        for j, p in enumerate(layout.pairs):  # the last token sits at the card's last position
            assert pos[layout.last[j]] == len(plan.heads[p.head]) + len(p.tail) - 1
        got: set[tuple[int, int]] = set()
        q_idx, kv_idx, mask = idx.q_idx.tolist(), idx.kv_idx.tolist(), idx.mask[:, 0].tolist()
        for r in range(layout.rows):
            for i in range(layout.q_len[r]):  # pad query rows are dropped by out_idx
                got |= {(q_idx[r][i], kv_idx[r][c]) for c in range(idx.max_k) if mask[r][i][c]}
        assert got == allowed
        out_rows = [divmod(o, idx.max_q) for o in idx.out_idx.tolist()]
        assert [q_idx[r][i] for r, i in out_rows] == list(range(layout.tokens))


@pytest.mark.parametrize("groups", [1, 2])
def test_gather_attention_equals_per_pair_attention(layouts: list[Any], groups: int) -> None:
    torch.manual_seed(0)
    for layout, _ in layouts:
        t, hq, d = layout.tokens, 4, 8
        q = torch.randn(t, hq, d)
        k, v = torch.randn(t, hq // groups, d), torch.randn(t, hq // groups, d)
        got = gather_attention(q, k, v, build_index(layout, "cpu", "gather"), 0.3)
        want = torch.zeros(t, hq * d)
        for r in range(layout.rows):
            qs, ql, ps, pl = (
                layout.q_start[r],
                layout.q_len[r],
                layout.pre_start[r],
                layout.pre_len[r],
            )
            keys = list(range(ps, ps + pl)) + list(range(qs, qs + ql))
            kk = k[keys].repeat_interleave(groups, 1).transpose(0, 1)
            vv = v[keys].repeat_interleave(groups, 1).transpose(0, 1)
            qq = q[qs : qs + ql].transpose(0, 1)
            mask = torch.ones(ql, pl + ql, dtype=torch.bool).tril(diagonal=pl)
            o = torch.nn.functional.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=mask, scale=0.3
            )
            want[qs : qs + ql] = o.transpose(0, 1).reshape(ql, -1)
        assert (got - want).abs().max().item() <= 1e-5
