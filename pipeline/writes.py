"""WriteService: add, change and delete documents on the running service, by the ingest job's rules.

The rules (chunking, passage ids, unchanged documents skipped without embedding, stale passages deleted
after the new ones are written) are :mod:`pipeline.chunking` and :mod:`pipeline.documents`, shared
with ``python -m ingest``.

Writes never starve searches:

- **one write runs at a time**, on its own thread; behind it wait at most ``WINNOW_WRITE_QUEUE_SIZE``
  requests and ``WINNOW_WRITE_QUEUE_CHARS`` characters of text (the embedding work), else 429 with
  Retry-After. Searches have their own path and are never queued behind a write;
- a write embeds its passages in **slices** of ``WINNOW_WRITE_EMBED_SLICE`` passages as *background*
  work of the embedder: a search's query embed waiting for the embedder goes before the next slice,
  so it waits for at most one slice, whatever the size of the batch.

A batch is applied in groups of whole documents (about ``WINNOW_INGEST_BATCH_SIZE`` passages): each
group is upserted, then its stale passages deleted. If Milvus fails mid-batch, :class:`PartialWrite`
says exactly which documents were applied and which were not (those may hold some new passages beside
their old ones); sending the same batch again is safe and finishes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline.chunking import Chunker, chunker_for
from pipeline.config import Settings
from pipeline.documents import Change, Status, check_document, plan_changes, write_plan
from pipeline.domain import Document, Hit, Passage
from pipeline.embedding import Embedder
from pipeline.errors import RequestError, TooLarge
from pipeline.store import StoreError, VectorStore

log = logging.getLogger(__name__)

DocStatus = Literal[Status, "rejected", "deleted", "not_found"]  # a write's, a delete's
MAX_PASSAGES_SHOWN = 16384  # GET /v1/documents/{id}: Milvus' own query window
# Milvus Lite rebuilds BM25 statistics over unflushed rows on every query: flush after this many
# rows written (a Milvus server seals segments by itself; there a flush per write would only make
# small segments)
LITE_FLUSH_ROWS = 2048


class WriteOverloaded(RuntimeError):
    """The write queue is full (→ 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class DocumentNotFound(LookupError):
    """No passage of this document is stored (→ 404)."""

    def __init__(self, doc_id: str) -> None:
        self.message = f"no document with id {doc_id!r} is stored"
        super().__init__(self.message)


@dataclass(slots=True)
class DocResult:
    """One document's outcome; ``passages``/``embedded``/``deleted`` count passages."""

    id: str
    status: DocStatus
    passages: int = 0
    embedded: int = 0
    deleted: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class PartialWrite(StoreError):
    """Milvus failed mid-batch: ``applied`` were written completely, ``not_applied`` were not
    (→ 503 with both lists)."""

    def __init__(self, applied: list[DocResult], not_applied: list[str]) -> None:
        self.applied, self.not_applied = applied, not_applied
        self.message = (
            f"the vector store failed after {len(applied)} of {len(applied) + len(not_applied)} "
            "documents were applied; send the not_applied ones again (resending the whole batch "
            "is safe too)"
        )
        super().__init__(self.message)


class WriteService:
    def __init__(self, settings: Settings, embedder: Embedder, store: VectorStore) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self._chunker: Chunker | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="winnow-write")  # one write at a time
        self._lock = threading.Lock()  # guards the admission counters (released on the writer)
        self._requests = 0
        self._chars = 0
        self._chars_per_s = 0.0  # measured embedding throughput of writes (for Retry-After)
        self._unflushed = 0  # rows written or deleted since the last flush (writer thread only)
        self.last_write = -1e9  # monotonic time the last write finished

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            self._chunker = chunker_for(self.embedder, self.settings.ingest)
        return self._chunker

    def stats(self) -> dict[str, Any]:
        return {"write_queue_depth": self._requests, "write_queue_chars": self._chars}

    # --- admission -------------------------------------------------------------------------
    def _admit(self, chars: int) -> None:
        s = self.settings
        if chars > s.write_queue_chars:
            raise TooLarge(
                f"the documents hold {chars} characters; one write may carry at most "
                f"{s.write_queue_chars} (WINNOW_WRITE_QUEUE_CHARS): split the batch",
                kind="write_too_large",
            )
        with self._lock:
            full = self._requests >= s.write_queue_size or (
                self._requests > 0 and self._chars + chars > s.write_queue_chars
            )
            if not full:
                self._requests += 1
                self._chars += chars
                return
            pending = self._chars
        rate = self._chars_per_s or 20_000.0
        raise WriteOverloaded(
            f"the write queue is full ({s.write_queue_size} requests / {s.write_queue_chars} "
            "characters, WINNOW_WRITE_QUEUE_SIZE / WINNOW_WRITE_QUEUE_CHARS)",
            min(60.0, max(1.0, math.ceil(pending / rate))),
        )

    def _done(self, chars: int) -> None:
        self.last_write = time.monotonic()
        with self._lock:
            self._requests -= 1
            self._chars -= chars

    async def _run(self, chars: int, fn: Any, *args: Any) -> Any:
        """Admit, then run ``fn`` on the writer thread; admission is released when it finishes
        (a client that leaves does not stop a write that has started)."""
        self._admit(chars)
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._done(chars)
            raise
        fut.add_done_callback(lambda _: self._done(chars))
        return await asyncio.wrap_future(fut)

    def _check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise RequestError(f"{what} is empty: send at least one", kind="empty_batch")
        if n > self.settings.max_write_documents:
            raise TooLarge(
                f"{n} {what}; the limit is {self.settings.max_write_documents} per request "
                "(WINNOW_MAX_WRITE_DOCUMENTS): split the batch",
                kind="too_many_documents",
            )

    # --- use cases ---------------------------------------------------------------------------
    async def upsert(self, docs: Sequence[Document]) -> list[DocResult]:
        """Create, update or skip each document; results in request order."""
        self._check_batch(len(docs), "documents")
        chars = sum(len(d.text) + len(d.title) for d in docs)
        return await self._run(chars, self._upsert, list(docs))

    async def delete(self, doc_ids: Sequence[str]) -> list[DocResult]:
        self._check_batch(len(doc_ids), "ids")
        return await self._run(0, self._delete, list(dict.fromkeys(doc_ids)))

    async def get(self, doc_id: str) -> list[Hit]:
        hits = await asyncio.to_thread(self.store.passages_of, doc_id, MAX_PASSAGES_SHOWN)
        if not hits:
            raise DocumentNotFound(doc_id)
        return hits

    # --- on the writer thread ----------------------------------------------------------------
    def _upsert(self, docs: list[Document]) -> list[DocResult]:
        results: dict[str, DocResult] = {}
        rejected: dict[int, DocResult] = {}  # by position: a duplicate id has no result of its own
        batch: list[tuple[Document, list[Passage]]] = []
        taken: set[str] = set()
        for i, doc in enumerate(docs):
            reason = check_document(doc)
            if reason is None and doc.id in taken:
                reason = "duplicate id: an earlier document in this batch has it"
            passages = [] if reason else self.chunker.split(doc)
            if not reason and not passages:
                reason = "text is empty"
            if reason:
                rejected[i] = DocResult(doc.id, "rejected", reason=reason)
            else:
                batch.append((doc, passages))
                taken.add(doc.id)
        if batch:
            stored = self.store.ids_by_doc([d.id for d, _ in batch])
            try:
                self._apply(plan_changes(batch, stored), results)
            except PartialWrite as exc:
                exc.applied += list(rejected.values())
                raise
        return [rejected[i] if i in rejected else results[d.id] for i, d in enumerate(docs)]

    def _apply(self, changes: list[Change], results: dict[str, DocResult]) -> None:
        """Write the changes group by group; a failure names exactly what was applied."""
        limit = self.settings.ingest_batch_size
        groups: list[list[Change]] = [[]]
        size = 0
        for change in changes:
            if change.status == "unchanged":
                results[change.doc_id] = DocResult(change.doc_id, "unchanged", change.passages)
                continue
            if size >= limit:
                groups.append([])
                size = 0
            groups[-1].append(change)
            size += len(change.todo)
        done: list[str] = []
        for group in groups:
            try:
                self._write_group(group)
            except StoreError as exc:
                applied = list(results.values())  # rejected, unchanged and written ones
                pending = [c.doc_id for c in changes if c.doc_id not in results]
                log.warning("write failed after %d documents: %s", len(done), exc)
                raise PartialWrite(applied, pending) from exc
            for c in group:
                results[c.doc_id] = DocResult(
                    c.doc_id, c.status, c.passages, len(c.todo), len(c.stale)
                )
                done.append(c.doc_id)

    def _write_group(self, group: list[Change]) -> None:
        todo = [p for c in group for p in c.todo]
        stale = [i for c in group for i in c.stale]
        if not todo and not stale:
            return
        vectors = self._embed([p.search_text for p in todo])
        write_plan(self.store, todo, vectors, stale, self.settings.ingest_batch_size)
        self._written(len(todo) + len(stale))

    def _written(self, rows: int) -> None:
        self._unflushed += rows
        if self.store.is_lite and self._unflushed >= LITE_FLUSH_ROWS:
            try:
                self.store.flush()
            except StoreError as exc:  # the write itself is done; flush again after the next one
                log.warning("flush after writes failed: %s", exc)
                return
            self._unflushed = 0

    def _embed(self, texts: list[str]) -> np.ndarray:
        """In background slices: a search's query embed never waits behind more than one."""
        step = self.settings.write_embed_slice
        parts = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), step):
            parts.append(self.embedder.embed(texts[i : i + step], query=False, background=True))
        seconds = time.perf_counter() - t0
        if texts and seconds > 0:
            rate = sum(map(len, texts)) / seconds
            self._chars_per_s = (
                rate if not self._chars_per_s else 0.8 * self._chars_per_s + 0.2 * rate
            )
        if not parts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(parts)

    def _delete(self, doc_ids: list[str]) -> list[DocResult]:
        stored = self.store.ids_by_doc(doc_ids)
        found = [d for d in doc_ids if stored.get(d)]
        self.store.delete_docs(found)
        self._written(sum(len(stored[d]) for d in found))
        return [
            DocResult(d, "deleted", deleted=len(stored[d]))
            if stored.get(d)
            else DocResult(d, "not_found")
            for d in doc_ids
        ]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
