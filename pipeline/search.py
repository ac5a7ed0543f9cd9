"""SearchService: Winnow's search, with its limits and defaults resolved once.

``search``: embed → recall (dense | hybrid | bm25) → rerank → fold passages into documents → top_n;
when the reranker cannot score every candidate within the budget (``rerank_budget_ms``, else the
deadline), the best-recalled candidates that fit are reranked and the rest follow below them in
recall order, marked (``reranked`` per result, a count per response), instead of a 413. The rerank
use cases it builds on (caller-supplied documents: /v1/rerank, /score) are
:class:`~pipeline.reranking.RerankService`'s.

No FastAPI here: the API, the CLI and the evaluator all call the same code, and request problems are
raised as :mod:`pipeline.errors` exceptions that the API maps to status codes in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.config import Settings
from pipeline.domain import Hit, join_title
from pipeline.embedding import Embedder
from pipeline.errors import RequestError, RerankDisabled, TooLarge
from pipeline.ranking import Result, above, fold_documents
from pipeline.rerank.base import Reranker
from pipeline.rerank.batcher import DeadlineExceeded, WorkTooLarge
from pipeline.reranking import RerankService, at_most
from pipeline.store import VectorStore

log = logging.getLogger(__name__)
RecallMode = Literal["dense", "hybrid", "bm25"]
EMPTY_COLLECTION = (
    "the collection is empty: add documents with POST /v1/documents, the web page, or "
    "python -m ingest PATH [--server http://HOST:PORT]"
)


@dataclass(slots=True)
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float]
    candidates: int
    reranked: int  # candidates (passages) the reranker scored: the best-recalled `reranked` of them
    mode: RecallMode
    below_min_score: int | None = None  # documents dropped by min_score (None: none asked)
    message: str | None = None  # set when the collection is empty: how to add documents
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchService(RerankService):
    """Search (embed → recall → rerank → fold) beside the rerank use cases it builds on."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: VectorStore,
        reranker: Reranker | None = None,
    ) -> None:
        super().__init__(settings, reranker)
        self.embedder = embedder
        self.store = store

    async def recall(
        self, query: str, top_k: int, *, mode: RecallMode, filter: str = ""
    ) -> tuple[list[Hit], float, float]:
        """Candidates and the embed / recall times in ms."""
        t0 = time.perf_counter()
        self.store.raise_if_open()  # Milvus known down: 503 now, without embedding the query
        vector = None
        if mode != "bm25":
            vector = (await asyncio.to_thread(self.embedder.embed, [query], query=True))[0]
        t1 = time.perf_counter()
        # on the store's own threads, under a deadline that holds here (see VectorStore.arun)
        if mode == "dense":
            hits = await self.store.arun(self.store.dense, vector, top_k, filter)
        elif mode == "hybrid":
            hits = await self.store.arun(self.store.hybrid, vector, query, top_k, filter)
        else:
            hits = await self.store.arun(self.store.bm25, query, top_k, filter)
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
        max_chunks_per_doc: int | None = None,
        min_score: float | None = None,
        rerank_budget_ms: int | None = None,
        partial: bool = True,
    ) -> SearchResponse:
        """``partial=False``: rerank every candidate or refuse (413/429) — for the evaluator, whose
        rankings must be the model's, never cut by a budget."""
        s = self.settings
        t_start = time.perf_counter()
        top_k = top_k if top_k is not None else s.top_k
        top_n = top_n if top_n is not None else s.top_n
        chunks = self.chunks(max_chunks_per_doc)
        self.check_text(query, instruction)
        at_most("top_k", top_k, s.max_top_k, "WINNOW_MAX_TOP_K")
        at_most("top_n", top_n, s.max_top_n, "WINNOW_MAX_TOP_N")
        if len(filter) > s.max_filter_chars:
            raise RequestError(
                f"filter is {len(filter)} characters; the limit is {s.max_filter_chars} "
                "(WINNOW_MAX_FILTER_CHARS)",
                kind="filter_too_long",
            )
        if mode is None:
            mode = "hybrid" if (hybrid if hybrid is not None else s.hybrid) else "dense"
        do_rerank = rerank if rerank is not None else self.reranker is not None
        if do_rerank and self.reranker is None:
            raise RerankDisabled()
        hits, embed_ms, recall_ms = await self.recall(query, top_k, mode=mode, filter=filter)
        rerank_ms = 0.0
        windows: dict[str, int] = {}
        scored: list[tuple[Hit, float]] = []
        if do_rerank and hits:
            t0 = time.perf_counter()
            budget = self.budget_s(rerank_budget_ms) if partial else None
            try:
                best, _ = await self.score(
                    query,
                    [join_title(h.title, h.text) for h in hits],
                    instruction if instruction is not None else s.rerank_instruction,
                    chunks,
                    budget,
                )
            except DeadlineExceeded:
                if budget is None:
                    raise
                # planned to fit, ran slower: the candidates keep their recall order (reranked 0)
                log.warning("rerank missed its deadline; answering in recall order")
                best = []
            except WorkTooLarge as exc:  # planned to fit: only a race with the cache gets here
                raise TooLarge(
                    f"{exc.message} Here the work is the {len(hits)} recalled candidates "
                    f"(each in up to {chunks} windows): lower top_k or max_chunks_per_doc.",
                    kind="work_too_large",
                ) from exc
            rerank_ms = (time.perf_counter() - t0) * 1000
            scored = [(h, score) for h, (score, _) in zip(hits, best, strict=False)]
            if chunks > 1:
                windows = {h.id: k for h, (_, k) in zip(hits, best, strict=False)}
        # reranked documents first by P(yes), then the others by recall (never above them)
        top = fold_documents(scored, None)
        seen = {h.doc_id for h, _ in top}
        rest = [(h, h.score) for h in hits[len(scored) :] if h.doc_id not in seen]
        folded = [(h, score, True) for h, score in top]
        folded += [(h, score, False) for h, score in fold_documents(rest, None)]
        order, below = above([score for _, score, _ in folded], min_score)
        kept = set(order)
        ranked = [folded[i] for i in range(len(folded)) if i in kept][:top_n]
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
                rerank_score=float(score) if reranked else None,
                best_window=windows.get(h.id),
                reranked=reranked,
            )
            for h, score, reranked in ranked
        ]
        message = None
        if not hits and not filter and await asyncio.to_thread(self.store.count) == 0:
            message = EMPTY_COLLECTION
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
            reranked=len(scored),
            mode=mode,
            below_min_score=below,
            message=message,
        )
