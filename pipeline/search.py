"""SearchService: embed → recall (dense | hybrid) → rerank → fold passages into documents → top_n.

No FastAPI here: the API, the CLI and the evaluator all call the same code.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.config import Settings
from pipeline.domain import Hit, join_title
from pipeline.embedding import Embedder
from pipeline.rerank import Reranker
from pipeline.store import MilvusStore

RecallMode = Literal["dense", "hybrid", "bm25"]


class RerankUnavailable(RuntimeError):
    """Reranking was asked for but the service runs without a reranker."""


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


@dataclass(slots=True)
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float]
    candidates: int
    reranked: bool
    mode: RecallMode
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fold_documents(hits: list[tuple[Hit, float]], top_n: int) -> list[tuple[Hit, float]]:
    """Best passage per document (max-passage), best first: qrels judge documents, not passages."""
    best: dict[str, tuple[Hit, float]] = {}
    for hit, score in hits:
        cur = best.get(hit.doc_id)
        if cur is None or score > cur[1]:
            best[hit.doc_id] = (hit, score)
    return sorted(best.values(), key=lambda hs: hs[1], reverse=True)[:top_n]


class SearchService:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: MilvusStore,
        reranker: Reranker | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.reranker = reranker

    async def recall(
        self, query: str, top_k: int, *, mode: RecallMode, filter: str = ""
    ) -> tuple[list[Hit], float, float]:
        """Candidates and the embed / recall times in ms."""
        t0 = time.perf_counter()
        vector = None
        if mode != "bm25":
            vector = (await asyncio.to_thread(self.embedder.embed, [query], query=True))[0]
        t1 = time.perf_counter()
        if mode == "dense":
            hits = await asyncio.to_thread(self.store.search, vector, top_k, filter)
        elif mode == "hybrid":
            hits = await asyncio.to_thread(self.store.hybrid, vector, query, top_k, filter)
        else:
            hits = await asyncio.to_thread(self.store.bm25, query, top_k, filter)
        t2 = time.perf_counter()
        return hits, (t1 - t0) * 1000, (t2 - t1) * 1000

    async def search(
        self,
        query: str,
        *,
        top_k: int | None = None,
        top_n: int | None = None,
        instruction: str | None = None,
        filter: str = "",
        hybrid: bool | None = None,
        rerank: bool | None = None,
        mode: RecallMode | None = None,
    ) -> SearchResponse:
        s = self.settings
        t_start = time.perf_counter()
        top_k = top_k if top_k is not None else s.top_k
        top_n = top_n if top_n is not None else s.top_n
        if mode is None:
            mode = "hybrid" if (hybrid if hybrid is not None else s.hybrid) else "dense"
        do_rerank = rerank if rerank is not None else self.reranker is not None
        if do_rerank and self.reranker is None:
            raise RerankUnavailable(
                "reranking is off on this server (WINNOW_RERANK=off or no reranker model); "
                "send rerank=false"
            )
        hits, embed_ms, recall_ms = await self.recall(query, top_k, mode=mode, filter=filter)
        rerank_ms = 0.0
        if do_rerank and hits:
            assert self.reranker is not None
            t0 = time.perf_counter()
            scores = await self.reranker.score(
                query,
                [join_title(h.title, h.text) for h in hits],
                instruction if instruction is not None else s.rerank_instruction,
            )
            rerank_ms = (time.perf_counter() - t0) * 1000
            scored = list(zip(hits, scores, strict=True))
        else:
            scored = [(h, h.score) for h in hits]
        ranked = fold_documents(scored, top_n)
        results = [
            Result(
                id=h.id,
                doc_id=h.doc_id,
                score=float(score),
                recall_score=float(h.score),
                text=h.text,
                title=h.title,
                metadata=h.metadata,
                chunk=h.chunk,
                rerank_score=float(score) if do_rerank else None,
            )
            for h, score in ranked
        ]
        total_ms = (time.perf_counter() - t_start) * 1000
        return SearchResponse(
            results=results,
            timings_ms={
                "embed": round(embed_ms, 3),
                "recall": round(recall_ms, 3),
                "rerank": round(rerank_ms, 3),
                "total": round(total_ms, 3),
            },
            candidates=len(hits),
            reranked=bool(do_rerank and hits),
            mode=mode,
        )
