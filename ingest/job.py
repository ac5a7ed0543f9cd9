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
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Settings
from pipeline.domain import Passage
from pipeline.embedding import Embedder
from pipeline.runtime import build_embedder, open_store
from pipeline.store import MilvusStore

from .chunking import Chunker
from .sources import Document, FieldMap, Problem, read_corpus

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
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Exit status: fail only when nothing at all could be ingested."""
        return self.documents > 0


def chunker_for(embedder: Embedder, settings: Settings) -> Chunker:
    prompt_tokens = 0
    prompts = getattr(embedder.encoder, "prompts", None) or {}
    if prompts.get("document"):
        prompt_tokens = len(
            embedder.tokenizer(prompts["document"], add_special_tokens=False)["input_ids"]
        )
    limit = embedder.max_seq_length - 2 - prompt_tokens  # [CLS]/[SEP] or BOS/EOS
    size = max(16, min(settings.chunk_tokens, limit))
    return Chunker(embedder.tokenizer, size, min(settings.chunk_overlap, size // 2))


class IngestJob:
    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        store: MilvusStore | None = None,
        collection: str | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder if embedder is not None else build_embedder(settings)
        self.store = store if store is not None else open_store(settings, collection)

    def _process(
        self, batch: Sequence[tuple[Document, list[Passage]]], stats: IngestStats
    ) -> Future[None] | None:
        """Embed what changed; hand the write to the writer thread (overlaps the next embed)."""
        stored = self.store.ids_by_doc([d.id for d, _ in batch])
        todo: list[Passage] = []
        stale: list[str] = []
        for doc, passages in batch:
            new_ids = {p.id for p in passages}
            have = stored.get(doc.id, set())
            if have == new_ids:
                stats.unchanged += 1
                continue
            todo.extend(p for p in passages if p.id not in have)
            stale.extend(have - new_ids)
        if not todo and not stale:
            return None
        vectors = self.embedder.embed([p.search_text for p in todo], query=False)
        stats.embedded += len(todo)
        stats.deleted += len(stale)

        def write() -> None:
            self.store.upsert(todo, vectors)
            self.store.delete(stale)  # only after the new passages are stored
            log.debug("wrote %d passages, deleted %d", len(todo), len(stale))

        return self._writer.submit(write)

    def run(
        self,
        paths: Iterable[str | Path],
        *,
        fields: FieldMap | None = None,
        progress: bool = True,
    ) -> IngestStats:
        from tqdm import tqdm

        t0 = time.perf_counter()
        stats = IngestStats()
        self.embedder.load()
        self.store.ensure_collection(self.embedder.dim, self.settings.embed_model)
        chunker = chunker_for(self.embedder, self.settings)
        batch_limit = self.settings.ingest_batch_size
        seen: set[str] = set()
        files: set[Path] = set()
        batch: list[tuple[Document, list[Passage]]] = []
        pending = 0
        inflight: Future[None] | None = None
        bar = tqdm(desc="ingest", unit=" doc", disable=not progress, dynamic_ncols=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="winnow-upsert")

        def flush_batch() -> None:
            nonlocal batch, pending, inflight
            if not batch:
                return
            fut = self._process(batch, stats)
            if inflight is not None:
                inflight.result()
            inflight = fut
            bar.set_postfix(passages=stats.passages, embedded=stats.embedded, refresh=False)
            batch, pending = [], 0

        try:
            for path, item in read_corpus(paths, fields):
                if path is not None:
                    files.add(path)
                if isinstance(item, Problem):
                    stats.problems.append(item)
                    stats.skipped += 1
                    log.warning("skipped %s", item)
                    continue
                if item.id in seen:
                    stats.problems.append(
                        Problem(item.source, None, f"duplicate document id {item.id!r}")
                    )
                    stats.skipped += 1
                    log.warning("skipped %s: duplicate document id %r", item.source, item.id)
                    continue
                passages = chunker.split(item)
                if not passages:
                    stats.problems.append(Problem(item.source, None, "empty text"))
                    stats.skipped += 1
                    continue
                seen.add(item.id)
                stats.documents += 1
                stats.passages += len(passages)
                batch.append((item, passages))
                pending += len(passages)
                bar.update(1)
                if pending >= batch_limit:
                    flush_batch()
            flush_batch()
            if inflight is not None:
                inflight.result()
            self.store.flush()
        finally:
            self._writer.shutdown(wait=True)
            bar.close()
        stats.files = len(files)
        stats.seconds = time.perf_counter() - t0
        return stats


def summary_table(stats: IngestStats, count: int | None = None) -> str:
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
        ("seconds", f"{stats.seconds:.1f}"),
        ("passages/s (embedded)", f"{stats.passages_per_s:.1f}"),
    ]
    if count is not None:
        rows.append(("passages in collection", count))
    for k, v in rows:
        t.add_row(k, str(v))
    console = Console(width=80, file=io.StringIO())
    console.print(t)
    return console.file.getvalue()
