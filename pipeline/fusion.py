"""The hybrid fusion methods: one registry (:data:`FUSIONS`) that config, the stores and bench read.

Each method is its formula over the two lists (dense, BM25; best first) and, where Milvus can fuse
it inside ``hybrid_search``, the Milvus ranker that computes the same formula. Adding a method is
one :class:`Fusion` entry here (plus its test): the ``fusion`` setting's values, the stores and
``bench/fusion.py`` take their names from this registry.

Milvus fuses ``rrf`` (``RRFRanker``) and ``weighted`` (``WeightedRanker``) itself. Its
``WeightedRanker`` normalises each score by a fixed function of the metric — ``(1 + cos) / 2`` for
COSINE, ``2·atan(s)/π`` for BM25 — the same in Milvus Lite and a Milvus server. BM25 scores of a
few words are tens, so ``2·atan(s)/π`` squeezes a whole result list into about 0.95-0.99 and the
BM25 side barely moves the order. Rescaling each list by its own minimum and maximum for the query
(min-max, the "convex combination" of the hybrid-retrieval literature) needs the whole list, which
no Milvus ranker has; so ``normalized`` takes the two lists Milvus returns and fuses them here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.domain import Hit


@dataclass(frozen=True, slots=True)
class FusionParams:
    """The settings a fusion reads: WINNOW_RRF_K, WINNOW_FUSION_{DENSE,BM25}_WEIGHT."""

    rrf_k: int = 5
    weights: tuple[float, float] = (0.5, 0.5)  # dense, BM25


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
    scores must already be positive (the stores make them so).
    """
    fused: dict[str, list] = {}  # passage id -> [hit, score]
    for hits, weight in ((dense, w_dense), (bm25, w_bm25)):
        for hit, norm in zip(hits, minmax([h.score for h in hits]), strict=True):
            entry = fused.setdefault(hit.id, [hit, 0.0])
            entry[1] += weight * norm
    ranked = sorted(fused.values(), key=lambda e: (-e[1], e[0].id))[:k]
    return [replace(hit, score=score) for hit, score in ranked]


def combine(
    dense: Sequence[Hit], bm25: Sequence[Hit], k: int, score: Callable[[int, int, Hit], float]
) -> list[Hit]:
    """Sum ``score(route, rank, hit)`` per passage over both lists (route 0 dense, 1 BM25); best
    ``k``, equal scores ordered by passage id, as Milvus's sort breaks ties."""
    total: dict[str, list] = {}
    for route, hits in enumerate((dense, bm25)):
        for rank, h in enumerate(hits):
            entry = total.setdefault(h.id, [h, 0.0])
            entry[1] += score(route, rank, h)
    ranked = sorted(total.values(), key=lambda e: (-e[1], e[0].id))[:k]
    return [replace(h, score=s) for h, s in ranked]


def _rrf(dense: Sequence[Hit], bm25: Sequence[Hit], p: FusionParams, k: int) -> list[Hit]:
    """Σ 1/(k + rank) per passage, rank from 1 (Milvus ``RRFRanker(k)``)."""
    return combine(dense, bm25, k, lambda _route, rank, _h: 1.0 / (p.rrf_k + rank + 1))


# Milvus WeightedRanker's norm_score: COSINE as (1 + s) / 2, BM25 as 2·atan(s)/π
_MILVUS_NORM = (lambda s: (1.0 + s) * 0.5, lambda s: 2.0 * math.atan(s) / math.pi)


def _weighted(dense: Sequence[Hit], bm25: Sequence[Hit], p: FusionParams, k: int) -> list[Hit]:
    """w·(1 + cos)/2 + w'·2·atan(bm25)/π (Milvus ``WeightedRanker(w, w', norm_score=True)``)."""
    w = p.weights
    return combine(dense, bm25, k, lambda route, _rank, h: w[route] * _MILVUS_NORM[route](h.score))


def _normalized(dense: Sequence[Hit], bm25: Sequence[Hit], p: FusionParams, k: int) -> list[Hit]:
    return normalized_fusion(dense, bm25, p.weights[0], p.weights[1], k)


def _rrf_ranker(p: FusionParams) -> Any:
    from pymilvus import RRFRanker

    return RRFRanker(p.rrf_k)


def _weighted_ranker(p: FusionParams) -> Any:
    # norm_score=True: the same normalisation in Milvus Lite (which turns its negative BM25
    # distances positive before fusing) and a Milvus server
    from pymilvus import WeightedRanker

    return WeightedRanker(*p.weights, norm_score=True)


@dataclass(frozen=True, slots=True)
class Fusion:
    """One hybrid fusion method.

    ``fuse(dense, bm25, params, k)``: the formula over the two lists (BM25 scores positive), best
    ``k`` first. ``milvus_ranker(params)``: the pymilvus ranker that computes the same formula
    inside ``hybrid_search``, or None when Milvus cannot (the store then fetches both lists and
    fuses them with ``fuse``). ``param``: which setting it reads (bench sweeps that one).
    """

    name: str
    param: Literal["rrf_k", "weights"]
    fuse: Callable[[Sequence[Hit], Sequence[Hit], FusionParams, int], list[Hit]]
    milvus_ranker: Callable[[FusionParams], Any] | None = None
    help: str = ""  # one phrase for the setting's description


FUSIONS: dict[str, Fusion] = {
    f.name: f
    for f in (
        Fusion("rrf", "rrf_k", _rrf, _rrf_ranker, "Milvus RRFRanker, WINNOW_RRF_K"),
        Fusion(
            "weighted",
            "weights",
            _weighted,
            _weighted_ranker,
            "Milvus WeightedRanker: weighted sum of Milvus-normalised scores",
        ),
        Fusion(
            "normalized",
            "weights",
            _normalized,
            help="weighted sum of per-query min-max normalised scores, fused here",
        ),
    )
}
FUSION_NAMES: tuple[str, ...] = tuple(FUSIONS)
# the ``fusion`` setting's type, derived from the registry (pydantic checks the value against it)
FusionName = Literal[FUSION_NAMES]  # type: ignore[valid-type]


def fusion_help() -> str:
    """The methods for the ``fusion`` setting's description: ``rrf (…), weighted (…), …``."""
    return ", ".join(
        f"`{f.name}` ({f.help})" if f.help else f"`{f.name}`" for f in FUSIONS.values()
    )


def fusion(name: str) -> Fusion:
    """The registry entry of ``name``; ValueError naming the choices otherwise."""
    try:
        return FUSIONS[name]
    except KeyError:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {name!r}") from None
