"""SearchService: the two use cases of Winnow, with their limits and defaults resolved once.

- ``search``: embed → recall (dense | hybrid | bm25) → rerank → fold passages into documents → top_n;
- ``rerank``: score caller-supplied documents against a query (the Cohere-style /v1/rerank).

No FastAPI here: the API, the CLI and the evaluator all call the same code, and request problems are
raised as :mod:`pipeline.errors` exceptions that the API maps to status codes in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.config import Settings
from pipeline.domain import Hit, join_title
from pipeline.embedding import Embedder
from pipeline.errors import RequestError, RerankDisabled, TooLarge
from pipeline.rerank import Reranker, RerankRequest
from pipeline.rerank.batcher import WorkTooLarge
from pipeline.store import MilvusStore

RecallMode = Literal["dense", "hybrid", "bm25"]
EMPTY_COLLECTION = (
    "the collection is empty: add documents with POST /v1/documents, the web page, or "
    "python -m ingest PATH [--server http://HOST:PORT]"
)
CHARS_PER_TOKEN = 4  # for max_tokens_per_doc: a character cap first, the model then cuts exactly


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


@dataclass(slots=True)
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float]
    candidates: int
    reranked: bool
    mode: RecallMode
    below_min_score: int | None = None  # documents dropped by min_score (None: none asked)
    message: str | None = None  # set when the collection is empty: how to add documents
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            hits = await asyncio.to_thread(self.store.dense, vector, top_k, filter)
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
        max_chunks_per_doc: int | None = None,
        min_score: float | None = None,
    ) -> SearchResponse:
        s = self.settings
        t_start = time.perf_counter()
        top_k = top_k if top_k is not None else s.top_k
        top_n = top_n if top_n is not None else s.top_n
        chunks = self._chunks(max_chunks_per_doc)
        self._check_text(query, instruction)
        _at_most("top_k", top_k, s.max_top_k, "WINNOW_MAX_TOP_K")
        _at_most("top_n", top_n, s.max_top_n, "WINNOW_MAX_TOP_N")
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
        if do_rerank and hits:
            t0 = time.perf_counter()
            try:
                best = await self._score(
                    query,
                    [join_title(h.title, h.text) for h in hits],
                    instruction if instruction is not None else s.rerank_instruction,
                    chunks,
                )
            except WorkTooLarge as exc:  # the candidates are the work: say which knob to turn
                raise TooLarge(
                    f"{exc.message} Here the work is the {len(hits)} recalled candidates "
                    f"(each in up to {chunks} windows): lower top_k or max_chunks_per_doc.",
                    kind="work_too_large",
                ) from exc
            rerank_ms = (time.perf_counter() - t0) * 1000
            scored = [(h, score) for h, (score, _) in zip(hits, best, strict=True)]
            if chunks > 1:
                windows = {h.id: k for h, (_, k) in zip(hits, best, strict=True)}
        else:
            scored = [(h, h.score) for h in hits]
        folded = fold_documents(scored, None)
        order, below = above([score for _, score in folded], min_score)
        ranked = [folded[i] for i in order[:top_n]]
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
                best_window=windows.get(h.id),
            )
            for h, score in ranked
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
            reranked=bool(do_rerank and hits),
            mode=mode,
            below_min_score=below,
            message=message,
        )

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        truncate: bool = True,
        max_tokens_per_doc: int | None = None,
        max_chunks_per_doc: int | None = None,
        min_score: float | None = None,
    ) -> RerankResponse:
        """Score caller-supplied documents; best first, ``min_score`` and ``top_n`` applied."""
        s = self.settings
        if self.reranker is None:
            raise RerankDisabled()
        chunks = self._chunks(max_chunks_per_doc)
        self._check_text(query, instruction)
        if len(documents) > s.max_documents:
            raise TooLarge(
                f"{len(documents)} documents; the limit is {s.max_documents} per request "
                "(WINNOW_MAX_DOCUMENTS): split the request",
                kind="too_many_documents",
            )
        if not truncate:  # refuse what the server would cut; an explicit max_tokens_per_doc cuts
            too_long = [i for i, d in enumerate(documents) if len(d) > s.max_document_chars]
            if too_long:
                raise RequestError(
                    f"documents {too_long[:10]} exceed {s.max_document_chars} characters "
                    "(WINNOW_MAX_DOCUMENT_CHARS); shorten them or send truncate=true",
                    kind="document_too_long",
                )
        limit = s.max_document_chars
        if max_tokens_per_doc is not None:
            limit = min(limit, max_tokens_per_doc * CHARS_PER_TOKEN)
        t0 = time.perf_counter()
        best = await self._score(
            query,
            [d[:limit] for d in documents],
            instruction if instruction is not None else s.rerank_instruction,
            chunks,
        )
        order, below = above([score for score, _ in best], min_score)
        if top_n is not None:
            order = order[:top_n]
        return RerankResponse(
            results=[
                Ranked(i, float(best[i][0]), best[i][1] if chunks > 1 else None) for i in order
            ],
            documents=len(documents),
            model=self.reranker.model,
            rerank_ms=(time.perf_counter() - t0) * 1000,
            below_min_score=below,
        )

    async def _score(
        self, query: str, texts: Sequence[str], instruction: str, chunks: int
    ) -> list[tuple[float, int]]:
        """(score, best window) per text: ``chunks`` > 1 scores a long text in windows, all of them
        in the one reranker call (so they are batched together and count as its work)."""
        assert self.reranker is not None
        if chunks <= 1:
            scores = await self.reranker.score(query, texts, instruction)
            return [(score, 0) for score in scores]
        cutter_of = getattr(self.reranker, "document_cutter", None)
        cutter = cutter_of() if callable(cutter_of) else None
        if cutter is None:
            raise RequestError(
                "max_chunks_per_doc > 1 needs the reranker's tokenizer, which this server's "
                "reranker has not got (remote backend: set WINNOW_RERANK_TOKENIZER)",
                kind="windows_unavailable",
            )
        s = self.settings
        windows = await asyncio.to_thread(
            cutter.windows,
            RerankRequest(query, list(texts), instruction),
            chunks,
            s.rerank_window_overlap,
        )
        flat = [w for ws in windows for w in ws]
        scores = await self.reranker.score(query, flat, instruction)
        return best_of_windows(scores, [len(ws) for ws in windows])

    def _chunks(self, max_chunks_per_doc: int | None) -> int:
        s = self.settings
        chunks = max_chunks_per_doc if max_chunks_per_doc is not None else s.rerank_chunks_per_doc
        _at_most(
            "max_chunks_per_doc",
            chunks,
            s.rerank_max_chunks_per_doc,
            "WINNOW_RERANK_MAX_CHUNKS_PER_DOC",
        )
        return chunks

    def _check_text(self, query: str, instruction: str | None) -> None:
        """Query and instruction have their own caps: only documents are ever cut."""
        s = self.settings
        if not query.strip():
            raise RequestError("query is empty: send the text to search for", kind="empty_query")
        if len(query) > s.max_query_chars:
            raise RequestError(
                f"query is {len(query)} characters; the limit is {s.max_query_chars} "
                "(WINNOW_MAX_QUERY_CHARS)",
                kind="query_too_long",
            )
        if instruction is not None and len(instruction) > s.max_instruction_chars:
            raise RequestError(
                f"instruction is {len(instruction)} characters; the limit is "
                f"{s.max_instruction_chars} (WINNOW_MAX_INSTRUCTION_CHARS)",
                kind="instruction_too_long",
            )


def _at_most(name: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise RequestError(f"{name} is {value}; the limit is {limit} ({setting})")
