"""RerankService: score caller-supplied documents against a query (/v1/rerank, /rerank, /score in
every dialect), with its limits and defaults resolved once; and the reranking step the search runs
over its candidates (``score``: windows, a budget).

No FastAPI here: request problems are raised as :mod:`pipeline.errors` exceptions that the API maps
to status codes in one place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from pipeline.config import Settings
from pipeline.errors import RequestError, RerankDisabled, TooLarge
from pipeline.ranking import Ranked, RerankResponse, ScoreResponse, above, best_of_windows
from pipeline.rerank.base import Reranker, RerankRequest
from pipeline.rerank.batcher import estimate_pair_tokens

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # for max_tokens_per_doc: a character cap first, the model then cuts exactly
# Unicode White_Space: what the schemas' pattern "\S" (pydantic's regex) calls blank; str.strip() also
# strips control characters such as \x1e, which the schema accepts (one rule, or a valid body gets 422)
BLANK = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*")


class RerankService:
    """The rerank use cases over one reranker (None: reranking is off, 503)."""

    def __init__(self, settings: Settings, reranker: Reranker | None = None) -> None:
        self.settings = settings
        self.reranker = reranker
        self._counter: Any = None  # TokenCounter (usage of answers), built on first use
        self._counter_built = False
        self._counter_lock = threading.Lock()

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
            raise RerankDisabled("rerank")
        chunks = self.chunks(max_chunks_per_doc)
        self.check_text(query, instruction)
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
        texts = [d[:limit] for d in documents]
        instruction = instruction if instruction is not None else s.rerank_instruction
        if chunks <= 1:  # the count runs beside the scoring (its own thread and tokenizer)
            (best, _), tokens = await _all_or_none(
                [
                    self.score(query, texts, instruction, chunks),
                    self._prompt_tokens(query, texts, instruction),
                ]
            )
        else:
            best, scored = await self.score(query, texts, instruction, chunks)
            tokens = await self._prompt_tokens(query, scored, instruction)
        order, below = above([score for score, _ in best], min_score)
        if top_n:  # None or 0: all (vLLM's top_n=0)
            order = order[:top_n]
        return RerankResponse(
            results=[
                Ranked(i, float(best[i][0]), best[i][1] if chunks > 1 else None) for i in order
            ],
            documents=len(documents),
            model=self.reranker.model,
            rerank_ms=(time.perf_counter() - t0) * 1000,
            below_min_score=below,
            tokens=tokens,
        )

    def budget_s(self, rerank_budget_ms: int | None) -> float:
        """The search's rerank budget in seconds: the request's, else the setting, else the deadline."""
        s = self.settings
        ms = rerank_budget_ms if rerank_budget_ms is not None else s.search_rerank_budget_ms
        if ms:
            return ms / 1000
        return s.rerank_deadline_s if s.rerank_deadline_s else math.inf

    async def score_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        max_tokens_per_doc: int | None = None,
        max_chunks_per_doc: int | None = None,
    ) -> ScoreResponse:
        """vLLM's /score: one query against N documents (1:N), or N pairs (N:N), in input order.

        The pairs of each distinct query go to the reranker as one request (its admission, deadline,
        cache and limits), the queries concurrently; the first failure cancels the rest.
        """
        if self.reranker is None:
            raise RerankDisabled("rerank")
        if not queries or not documents:
            raise RequestError("send at least one query and one document to score")
        if len(queries) > 1 and len(queries) != len(documents):
            raise RequestError(
                f"{len(queries)} queries and {len(documents)} documents: send one query and N "
                "documents (1:N) or as many queries as documents (N:N, scored pairwise)"
            )
        if len(documents) > self.settings.max_documents:
            raise TooLarge(
                f"{len(documents)} pairs; the limit is {self.settings.max_documents} per request "
                "(WINNOW_MAX_DOCUMENTS): split the request",
                kind="too_many_documents",
            )
        groups: dict[str, list[int]] = {}
        for i in range(len(documents)):
            groups.setdefault(queries[i] if len(queries) > 1 else queries[0], []).append(i)
        calls = [
            self.rerank(
                q,
                [documents[i] for i in idx],
                instruction=instruction,
                max_tokens_per_doc=max_tokens_per_doc,
                max_chunks_per_doc=max_chunks_per_doc,
            )
            for q, idx in groups.items()
        ]
        answers = await _all_or_none(calls)
        scores = [0.0] * len(documents)
        for idx, res in zip(groups.values(), answers, strict=True):
            for r in res.results:
                scores[idx[r.index]] = r.score
        return ScoreResponse(scores, self.reranker.model, sum(a.tokens for a in answers))

    async def _prompt_tokens(self, query: str, texts: Sequence[str], instruction: str) -> int:
        """Prompt tokens of the pairs as the model reads them: the card's cut applied, prefix and
        suffix included, every pair counted (a cached pair as if scored: usage does not tell whether
        someone sent the pair before). Estimated (characters / 4) without the model's tokenizer."""
        request = RerankRequest(query, list(texts), instruction)
        counter = await self._token_counter()
        if counter is None:
            return sum(estimate_pair_tokens(request, self.settings.rerank_max_length))
        return sum(await asyncio.to_thread(counter.pair_tokens, request))

    async def _token_counter(self) -> Any:
        """The counter over the reranker's tokenizer, built once for all requests (None: estimate).

        Built in a thread under a lock (concurrent first requests wait for the same build, on any
        event loop: a runtime may serve several apps)."""
        if self._counter_built:
            return self._counter
        return await asyncio.to_thread(self._build_counter)

    def _build_counter(self) -> Any:
        with self._counter_lock:
            if not self._counter_built:
                cutter = self.reranker.document_cutter() if self.reranker is not None else None
                if cutter is not None:
                    try:
                        self._counter = cutter.token_counter()
                    except Exception:  # usage falls back to the estimate; scoring is unaffected
                        log.warning("cannot copy the reranker's tokenizer: usage is estimated")
                self._counter_built = True
            return self._counter

    async def score(
        self,
        query: str,
        texts: Sequence[str],
        instruction: str,
        chunks: int,
        budget_s: float | None = None,
    ) -> tuple[list[tuple[float, int]], list[str]]:
        """(score, best window) per text, and the texts the reranker read: ``chunks`` > 1 scores a
        long text in windows, all of them in the one reranker call (so they are batched together
        and count as its work).

        ``budget_s``: only the leading texts whose work is predicted to fit it are sent, and of
        those only the ones scored within it come back (a run slower than predicted stops at the
        budget, the result is that much shorter); None = all of them (413/429 when they do not fit).
        """
        assert self.reranker is not None
        t0 = time.monotonic()
        if chunks <= 1:
            if budget_s is not None:
                fit = await self.reranker.affordable(query, texts, instruction, budget_s)
                texts = texts[:fit]
            if not texts:
                return [], []
            scores = await self._score_within(query, texts, instruction, budget_s, t0)
            return [(score, 0) for score in scores], list(texts[: len(scores)])
        cutter = self.reranker.document_cutter()
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
        if budget_s is not None:  # whole documents only: all of a document's windows, or none
            fit = await self.reranker.affordable(
                query, [w for ws in windows for w in ws], instruction, budget_s
            )
            used = docs = 0
            while docs < len(windows) and used + len(windows[docs]) <= fit:
                used += len(windows[docs])
                docs += 1
            windows = windows[:docs]
        flat = [w for ws in windows for w in ws]
        if not flat:
            return [], []
        scores = await self._score_within(query, flat, instruction, budget_s, t0)
        docs = used = 0
        while docs < len(windows) and used + len(windows[docs]) <= len(scores):
            used += len(windows[docs])  # whole documents only
            docs += 1
        return best_of_windows(scores[:used], [len(ws) for ws in windows[:docs]]), flat[:used]

    async def _score_within(
        self, query: str, texts: Sequence[str], instruction: str, budget_s: float | None, t0: float
    ) -> list[float]:
        """All of ``texts`` (no budget), or the leading ones scored by ``t0 + budget_s``."""
        assert self.reranker is not None
        left = math.inf if budget_s is None else budget_s - (time.monotonic() - t0)
        return await self.reranker.score_within(query, texts, instruction, left)

    def chunks(self, max_chunks_per_doc: int | None) -> int:
        s = self.settings
        chunks = max_chunks_per_doc if max_chunks_per_doc is not None else s.rerank_chunks_per_doc
        at_most(
            "max_chunks_per_doc",
            chunks,
            s.rerank_max_chunks_per_doc,
            "WINNOW_RERANK_MAX_CHUNKS_PER_DOC",
        )
        return chunks

    def check_text(self, query: str, instruction: str | None) -> None:
        """Query and instruction have their own caps: only documents are ever cut."""
        s = self.settings
        if BLANK.fullmatch(query):
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


async def _all_or_none(calls: Sequence[Any]) -> list[Any]:
    """Await all; on the first failure cancel the others and raise it (not an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


def at_most(name: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise RequestError(f"{name} is {value}; the limit is {limit} ({setting})")
