"""Pure-Python planning for the transformers reranker: tokenize, split heads, cut batches (no torch).

Every pair is the card's ``PREFIX + body + SUFFIX`` with the body tokenized by
:func:`pipeline.rerank.prompt.encode_bodies` (the card's exact call). Pairs of one request share a
*head* (prefix + instruction + query tokens); the rest of a pair is its *tail* (document + suffix).

Two batch shapes, one per execution plan of :class:`pipeline.rerank.backends.hf.engine.HFEngine`:

- **padded** (CPU default): rows of one tail each on top of their head's cached KV, left/right padded;
  cut by a token budget that counts padding and by a padding limit (on a CPU GEMM every pad token costs
  a full token, and 256–512 rows already reach peak).
- **packed** (CUDA default): one padding-free token stream per forward — each distinct head of the batch
  once, then every tail of that head — described by :class:`PackedLayout` (rows of the attention, RoPE
  positions, where to read each pair's score). On a GPU the cost is launches and glue, not FLOPs on pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.rerank.prompt import (
    body_budget,
    check_head_fits,
    common_prefix_len,
    encode_bodies,
    format_body,
    format_head,
)

if TYPE_CHECKING:
    from pipeline.rerank.prompt import RerankRequest


@dataclass(slots=True)
class Pair:
    """One (request, document) pair after tokenization: its head's index + its own tail tokens."""

    req: int
    doc: int
    head: int  # index into Plan.heads
    tail: list[int]


@dataclass(slots=True)
class Plan:
    """A tokenized micro-batch: unique heads, pairs, and the tokens the card code would run."""

    pairs: list[Pair]
    heads: list[list[int]]  # token ids (prefix included) per unique head
    reference_tokens: int


def tokenize(
    tokenizer: Any,
    requests: Sequence[RerankRequest],
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    max_length: int,
) -> Plan:
    """Tokenize like the card, then split each pair at its request's shared head.

    The head is the longest token prefix common to every pair of the request and to the document-free
    head text, so splitting never changes a token whatever the text or truncation. A head that leaves
    fewer than 16 tokens for the document raises :class:`~pipeline.rerank.prompt.PromptTooLong`: only
    documents are ever cut, never the instruction or query.
    """
    budget = body_budget(max_length, prefix_ids, suffix_ids)
    prefix, suffix = list(prefix_ids), list(suffix_ids)
    pairs: list[Pair] = []
    heads: list[list[int]] = []
    head_index: dict[tuple[int, ...], int] = {}
    ref_tokens = 0
    for ri, req in enumerate(requests):
        if not req.docs:
            continue
        texts = [format_head(req.query, req.instruction)]
        texts += [format_body(req.query, d, req.instruction) for d in req.docs]
        bodies = encode_bodies(tokenizer, texts, budget)
        head_body, doc_bodies = bodies[0], bodies[1:]
        check_head_fits(len(head_body), budget)
        shared = min(common_prefix_len(head_body, b) for b in doc_bodies)
        key = tuple(prefix + head_body[:shared])
        hi = head_index.get(key)
        if hi is None:
            hi = head_index[key] = len(heads)
            heads.append(list(key))
        for di, body in enumerate(doc_bodies):
            pairs.append(Pair(ri, di, hi, body[shared:] + suffix))
            ref_tokens += len(prefix) + len(body) + len(suffix)
    return Plan(pairs, heads, ref_tokens)


def cut_padded(
    pairs: Sequence[Pair],
    heads: Sequence[Sequence[int]],
    budget: int,
    min_fill: int,
    max_padding: float | None,
) -> list[list[Pair]]:
    """Sort by length, then cut so rows × (longest head + longest tail) stays within ``budget``.

    Past ``min_fill`` padded tail tokens, a batch also closes when the next pair would push its padding
    beyond ``max_padding`` × its real tail tokens: sorted neighbours batch together, and a long document
    no longer pads a batch of short ones to its length.
    """
    fill = min(min_fill, budget)
    slack = None if max_padding is None else 1.0 + max_padding
    order = sorted(pairs, key=lambda p: (len(heads[p.head]) + len(p.tail), p.head))
    batches: list[list[Pair]] = []
    cur: list[Pair] = []
    max_head = max_tail = real = 0
    for p in order:
        h, t = max(max_head, len(heads[p.head])), max(max_tail, len(p.tail))
        rows, tail_real = len(cur) + 1, real + len(p.tail)
        over_budget = rows * (h + t) > budget
        too_padded = slack is not None and rows * t > max(fill, slack * tail_real)
        if cur and (over_budget or too_padded):
            batches.append(cur)
            cur, h, t, tail_real = [], len(heads[p.head]), len(p.tail), len(p.tail)
        cur.append(p)
        max_head, max_tail, real = h, t, tail_real
    if cur:
        batches.append(cur)
    return batches


def cut_packed(
    pairs: Sequence[Pair], heads: Sequence[Sequence[int]], budget: int
) -> list[list[Pair]]:
    """Sort by tail length, then cut so the packed stream (distinct heads once + tails) fits ``budget``.

    No padding is counted because none is run; sorting keeps the rows of a batch of similar length,
    which bounds the padding *inside* the row-gathered attention. A pair longer than the budget alone
    still gets its own batch.
    """
    order = sorted(pairs, key=lambda p: (len(p.tail), p.head))
    batches: list[list[Pair]] = []
    cur: list[Pair] = []
    seen: set[int] = set()
    tokens = 0
    for p in order:
        add = len(p.tail) + (0 if p.head in seen else len(heads[p.head]))
        if cur and tokens + add > budget:
            batches.append(cur)
            cur, seen, tokens = [], set(), 0
            add = len(p.tail) + len(heads[p.head])
        cur.append(p)
        seen.add(p.head)
        tokens += add
    if cur:
        batches.append(cur)
    return batches


@dataclass(slots=True)
class PackedLayout:
    """One packed forward: the token stream and its attention rows (all plain ints, no torch).

    Row ``r`` of the attention has queries ``ids[q_start[r] : q_start[r] + q_len[r]]`` and keys
    ``pre_len[r]`` tokens from ``pre_start[r]`` (its head, for a tail row; none for a head row)
    followed by its own queries, causal aligned at the bottom right: query ``i`` of the row sees the
    whole head and its own tokens ``≤ i``. Positions are those of the card's unpacked sequence
    (``pre_len[r] + i``). Tail rows are listed in ``pairs`` order; ``last[j]`` is the stream index of
    pair ``j``'s last token, where its yes/no logits are read.
    """

    ids: list[int]
    q_start: list[int]
    q_len: list[int]
    pre_start: list[int]
    pre_len: list[int]
    last: list[int]
    pairs: list[Pair]
    head_tokens: int  # tokens of distinct heads in the stream

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def rows(self) -> int:
        return len(self.q_start)

    @property
    def max_q(self) -> int:
        return max(self.q_len)

    @property
    def max_k(self) -> int:
        return max(p + q for p, q in zip(self.pre_len, self.q_len, strict=True))


def pack(batch: Sequence[Pair], heads: Sequence[Sequence[int]]) -> PackedLayout:
    """Lay out ``batch`` as one stream: each distinct head once, then that head's tails."""
    by_head: dict[int, list[Pair]] = {}
    for p in batch:
        by_head.setdefault(p.head, []).append(p)
    ids: list[int] = []
    q_start: list[int] = []
    q_len: list[int] = []
    pre_start: list[int] = []
    pre_len: list[int] = []
    last: list[int] = []
    ordered: list[Pair] = []
    head_tokens = 0
    for h, group in by_head.items():
        hs, hl = len(ids), len(heads[h])
        ids.extend(heads[h])
        head_tokens += hl
        q_start.append(hs)
        q_len.append(hl)
        pre_start.append(hs)
        pre_len.append(0)
        for p in group:
            q_start.append(len(ids))
            q_len.append(len(p.tail))
            pre_start.append(hs)
            pre_len.append(hl)
            ids.extend(p.tail)
            last.append(len(ids) - 1)
            ordered.append(p)
    return PackedLayout(ids, q_start, q_len, pre_start, pre_len, last, ordered, head_tokens)
