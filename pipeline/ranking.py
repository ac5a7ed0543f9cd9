"""What a ranking is made of, and the pure steps that make it: results, the best passage per
document, the best window per document, a score threshold. No I/O: search, rerank and the
evaluator share them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.domain import Hit


@dataclass(slots=True)
class Result:
    id: str
    doc_id: str
    score: float
    recall_score: float
    text: str
    title: str
    metadata: dict[str, Any]
    chunk: int
    rerank_score: float | None = None
    best_window: int | None = None  # the window that gave the score (max_chunks_per_doc)
    # scored by the reranker (else ranked by recall, below every reranked one)
    reranked: bool = False


@dataclass(slots=True)
class Ranked:
    """One reranked document: its position in the request and P(yes)."""

    index: int
    score: float
    best_window: int | None = None


@dataclass(slots=True)
class RerankResponse:
    results: list[Ranked]
    documents: int
    model: str
    rerank_ms: float
    below_min_score: int | None = None  # documents dropped by min_score (None: none asked)
    tokens: int = 0  # prompt tokens of the pairs scored (usage; cached pairs count in full)


@dataclass(slots=True)
class ScoreResponse:
    """Scores of (query, document) pairs in input order (vLLM's /score)."""

    scores: list[float]
    model: str
    tokens: int


def fold_documents(hits: list[tuple[Hit, float]], top_n: int | None) -> list[tuple[Hit, float]]:
    """Best passage per document (max-passage), best first: qrels judge documents, not passages."""
    best: dict[str, tuple[Hit, float]] = {}
    for hit, score in hits:
        cur = best.get(hit.doc_id)
        if cur is None or score > cur[1]:
            best[hit.doc_id] = (hit, score)
    return sorted(best.values(), key=lambda hs: hs[1], reverse=True)[:top_n]


def best_of_windows(scores: Sequence[float], sizes: Sequence[int]) -> list[tuple[float, int]]:
    """Per document, (its best window's score, that window's index), from the flat window scores."""
    out, at = [], 0
    for n in sizes:
        part = scores[at : at + n]
        k = max(range(n), key=part.__getitem__)
        out.append((part[k], k))
        at += n
    return out


def above(scores: Sequence[float], min_score: float | None) -> tuple[list[int], int | None]:
    """Indices best first that reach ``min_score``, and how many fell below (None: no threshold)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if min_score is None:
        return order, None
    kept = [i for i in order if scores[i] >= min_score]
    return kept, len(order) - len(kept)
