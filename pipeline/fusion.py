"""Hybrid fusion that Milvus's rankers cannot do: a weighted sum of per-query min-max scores.

Milvus fuses ``rrf`` (``RRFRanker``) and ``weighted`` (``WeightedRanker``) itself. Its
``WeightedRanker`` normalises each score by a fixed function of the metric — ``(1 + cos) / 2`` for
COSINE, ``2·atan(s)/π`` for BM25 — the same in Milvus Lite and a Milvus server. BM25 scores of a
few words are tens, so ``2·atan(s)/π`` squeezes a whole result list into about 0.95-0.99 and the
BM25 side barely moves the order. Rescaling each list by its own minimum and maximum for the query
(min-max, the "convex combination" of the hybrid-retrieval literature) needs the whole list, which
no Milvus ranker has; so ``normalized`` takes the two lists Milvus returns and fuses them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipeline.domain import Hit


def minmax(scores: Sequence[float]) -> list[float]:
    """Each score rescaled to [0, 1] within its own list; a list of equal scores is all 1."""
    if not scores:
        return []
    lo, hi = min(scores), max(scores)
    if hi <= lo:
        return [1.0] * len(scores)
    return [(s - lo) / (hi - lo) for s in scores]


def normalized_fusion(
    dense: Sequence[Hit], bm25: Sequence[Hit], w_dense: float, w_bm25: float, k: int
) -> list[Hit]:
    """``w_dense·minmax(dense) + w_bm25·minmax(bm25)`` per passage, best ``k`` first.

    A passage missing from one list gets 0 from it (the bottom of that list), as Milvus's own
    WeightedRanker does; equal scores are ordered by passage id, as Milvus breaks ties. BM25
    scores must already be positive (MilvusStore makes them so).
    """
    fused: dict[str, list] = {}  # passage id -> [hit, score]
    for hits, weight in ((dense, w_dense), (bm25, w_bm25)):
        for hit, norm in zip(hits, minmax([h.score for h in hits]), strict=True):
            entry = fused.setdefault(hit.id, [hit, 0.0])
            entry[1] += weight * norm
    ranked = sorted(fused.values(), key=lambda e: (-e[1], e[0].id))[:k]
    return [replace(hit, score=score) for hit, score in ranked]
