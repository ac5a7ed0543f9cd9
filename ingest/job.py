"""The ingest job: read → chunk → embed in batches → upsert, streaming, idempotent and resumable.

Why it is safe to kill at any point: passage ids are a hash of their content, so an upsert of the same
passage is a no-op; a document whose stored ids already equal its computed ids is skipped without
embedding (this is what makes a rerun fast), and a changed document's old passages are deleted only
after its new ones are stored. Memory stays flat: one batch of passages is in flight at a time.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.chunking import Chunker, chunker_for
from pipeline.config import Settings
from pipeline.documents import check_document, plan_changes, write_plan
from pipeline.domain import Passage
from pipeline.embedding import Embedder
from pipeline.runtime import build_embedder, open_store
from pipeline.store import VectorStore

from .sources import Document, FieldMap, Problem, read_corpus

__all__ = ["Chunker", "IngestJob", "IngestStats", "Plan", "chunker_for", "summary_table"]

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    files: int = 0
    documents: int = 0
    unchanged: int = 0
    passages: int = 0
    embedded: int = 0
    deleted: int = 0
    skipped: int = 0
    seconds: float = 0.0  # the whole run, load_s included
    load_s: float = 0.0  # embedder load + opening the collection: paid once, not per passage
    # per-stage time split (seconds; embed/write are summed over workers in the Ray engine)
    read_s: float = 0.0
    embed_s: float = 0.0
    write_s: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        """Passages embedded and written per second of work: the model load is not in the rate."""
        work = self.seconds - self.load_s
        return self.embedded / work if work > 0 else 0.0

    @property
    def embed_per_s(self) -> float:
        """The embedder's own rate: passages per second spent in ``embed`` (what a GPU changes)."""
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Exit status: fail only when nothing at all could be ingested."""
        return self.documents > 0


@dataclass
class Plan:
    """What one batch of whole documents needs: passages to embed and write, then ids to delete."""

    todo: list[Passage]
    stale: list[str]


def upsert_bounded(
    store: VectorStore, passages: Sequence[Passage], vectors: np.ndarray, limit: int
) -> None:
    """Upsert in slices of at most ``limit`` rows (the Ray engine's writers; no deletes)."""
    write_plan(store, passages, vectors, [], limit)


class Progress:
    """The driver's live view: embedded passages (rate = passages/s), documents read, unchanged."""

    def __init__(self, stats: IngestStats, enabled: bool) -> None:
        from tqdm import tqdm

        self.stats = stats
        self.bar = tqdm(desc="ingest", unit=" passage", disable=not enabled, dynamic_ncols=True)

    def embedded(self, n: int) -> None:
        s = self.stats
        self.bar.set_postfix(
            docs=s.documents, passages=s.passages, unchanged=s.unchanged, refresh=False
        )
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def read_documents(
    paths: Iterable[str | Path], fields: FieldMap | None, stats: IngestStats
) -> Iterator[Document]:
    """Every readable, non-duplicate, non-empty document; problems counted in ``stats``.

    The reading half of every engine, ``--server`` included (which chunks on the server).
    """
    seen: set[str] = set()
    files: set[Path] = set()
    for path, item in read_corpus(paths, fields):
        if path is not None and path not in files:
            files.add(path)
            stats.files = len(files)
        if isinstance(item, Problem):
            stats.problems.append(item)
            stats.skipped += 1
            log.warning("skipped %s", item)
            continue
        if item.id in seen:
            stats.problems.append(Problem(item.source, None, f"duplicate document id {item.id!r}"))
            stats.skipped += 1
            log.warning("skipped %s: duplicate document id %r", item.source, item.id)
            continue
        if not item.text.strip():
            stats.problems.append(Problem(item.source, None, "empty text"))
            stats.skipped += 1
            continue
        reason = check_document(item)  # what Milvus would refuse, failing the whole batch
        if reason is not None:
            stats.problems.append(Problem(item.source, None, reason))
            stats.skipped += 1
            log.warning("skipped %s: %s", item.source, reason)
            continue
        seen.add(item.id)
        stats.documents += 1
        yield item


class IngestJob:
    """The single-process engine, and the shared read → chunk → plan → write logic of every engine.

    Engines differ only in ``_execute``: how the planned batches get embedded and written. Reading,
    chunking, duplicate and problem handling, the skip-unchanged plan and the write order (new
    passages first, stale ones deleted after) live here, once.
    """

    engine = "single"

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        store: VectorStore | None = None,
        collection: str | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder if embedder is not None else build_embedder(settings)
        self.store = store if store is not None else open_store(settings, collection)

    # --- shared steps ----------------------------------------------------------------------------
    def prepare(self) -> Chunker:
        """Load the embedder (tokenizer, dim) and open or create the collection: the model and
        dimension rule refuses a run before any document is read."""
        self.embedder.load()
        self.store.ensure_collection(self.embedder.dim, self.settings.embed_model)
        return chunker_for(self.embedder, self.settings.ingest)

    def documents(
        self,
        paths: Iterable[str | Path],
        fields: FieldMap | None,
        chunker: Chunker,
        stats: IngestStats,
    ) -> Iterator[tuple[Document, list[Passage]]]:
        """Every readable, non-duplicate, non-empty document with its passages; problems counted."""
        for doc in read_documents(paths, fields, stats):
            passages = chunker.split(doc)
            stats.passages += len(passages)
            yield doc, passages

    def plan(self, batch: Sequence[tuple[Document, list[Passage]]], stats: IngestStats) -> Plan:
        """Compare with what is stored (:mod:`pipeline.documents`' rules): unchanged documents are
        skipped without embedding."""
        todo: list[Passage] = []
        stale: list[str] = []
        for change in plan_changes(batch, self.store.ids_by_doc([d.id for d, _ in batch])):
            if change.status == "unchanged":
                stats.unchanged += 1
            todo.extend(change.todo)
            stale.extend(change.stale)
        return Plan(todo, stale)

    def plans(
        self,
        paths: Iterable[str | Path],
        fields: FieldMap | None,
        chunker: Chunker,
        stats: IngestStats,
    ) -> Iterator[Plan]:
        """Batches of whole documents (about ``ingest_batch_size`` passages) that need work."""
        limit = self.settings.ingest_batch_size
        batch: list[tuple[Document, list[Passage]]] = []
        pending = 0
        t = time.perf_counter()
        for doc, passages in self.documents(paths, fields, chunker, stats):
            batch.append((doc, passages))
            pending += len(passages)
            if pending >= limit:
                plan = self.plan(batch, stats)
                batch, pending = [], 0
                if plan.todo or plan.stale:
                    stats.read_s += time.perf_counter() - t
                    yield plan
                    t = time.perf_counter()
        if batch:
            plan = self.plan(batch, stats)
            if plan.todo or plan.stale:
                stats.read_s += time.perf_counter() - t
                yield plan
                t = time.perf_counter()
        stats.read_s += time.perf_counter() - t

    def write(self, plan: Plan, vectors: np.ndarray, stats: IngestStats) -> None:
        """New passages first, then the stale ones: a document never has none stored."""
        t = time.perf_counter()
        write_plan(self.store, plan.todo, vectors, plan.stale, self.settings.ingest_batch_size)
        stats.deleted += len(plan.stale)
        stats.write_s += time.perf_counter() - t
        log.debug("wrote %d passages, deleted %d", len(plan.todo), len(plan.stale))

    def delete_stale(self, plan: Plan, stats: IngestStats) -> None:
        self.store.delete(plan.stale)
        stats.deleted += len(plan.stale)

    def run(
        self,
        paths: Iterable[str | Path],
        *,
        fields: FieldMap | None = None,
        progress: bool = True,
    ) -> IngestStats:
        t0 = time.perf_counter()
        stats = IngestStats()
        chunker = self.prepare()
        stats.load_s = time.perf_counter() - t0
        bar = Progress(stats, progress)
        try:
            self._execute(self.plans(paths, fields, chunker, stats), stats, bar)
            self.store.flush()
        finally:
            bar.close()
        stats.seconds = time.perf_counter() - t0
        return stats

    # --- the single-process engine -----------------------------------------------------------------
    def _execute(self, plans: Iterator[Plan], stats: IngestStats, bar: Progress) -> None:
        """Embed in this process; one writer thread overlaps the write with the next embed."""
        inflight: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="winnow-upsert") as writer:
            for plan in plans:
                t = time.perf_counter()
                vectors = self.embedder.embed([p.search_text for p in plan.todo], query=False)
                stats.embed_s += time.perf_counter() - t
                stats.embedded += len(plan.todo)
                if inflight is not None:
                    inflight.result()
                inflight = writer.submit(self.write, plan, vectors, stats)
                bar.embedded(len(plan.todo))
            if inflight is not None:
                inflight.result()


def summary_table(
    stats: IngestStats, count: int | None = None, documents: int | None = None
) -> str:
    """A small table for the terminal (rich renders it; plain text when piped)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ingest summary", show_header=False)
    rows = [
        ("files", stats.files),
        ("documents", stats.documents),
        ("  unchanged (skipped)", stats.unchanged),
        ("passages", stats.passages),
        ("  embedded + upserted", stats.embedded),
        ("  stale passages deleted", stats.deleted),
        ("skipped (problems)", stats.skipped),
        ("model load (s)", f"{stats.load_s:.1f}"),
        ("ingest (s, after load)", f"{stats.seconds - stats.load_s:.1f}"),
        ("passages/s (after load)", f"{stats.passages_per_s:.1f}"),
        ("passages/s (embedding only)", f"{stats.embed_per_s:.1f}"),
    ]
    if count is not None:
        rows.append(("passages in collection", count))
    if documents is not None:
        rows.append(("documents in collection", documents))
    for k, v in rows:
        t.add_row(k, str(v))
    console = Console(width=80, file=io.StringIO())
    console.print(t)
    return console.file.getvalue()
