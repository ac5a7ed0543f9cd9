"""The rules of a write, shared by the ingest job and the write API: plan, then write in order.

Passage ids are a hash of their content (:func:`pipeline.domain.passage_id`), so:

- a document whose stored passage ids equal its computed ones is **unchanged**: skipped, never embedded;
- otherwise only passages not already stored are embedded and upserted (**created** when nothing was
  stored, **updated** when something was), and the stored ids it no longer has are **stale**;
- stale passages are deleted only *after* the new ones are written, so a document never has none.

Planning is pure (no I/O); :func:`write_plan` is the one write order both callers use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.domain import Document, Passage

if TYPE_CHECKING:
    import numpy as np

    from pipeline.store import MilvusStore

Status = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True, slots=True)
class Change:
    """What one document needs: passages to embed and write, then stored ids to delete."""

    doc_id: str
    status: Status
    passages: int
    todo: list[Passage]
    stale: list[str]


def plan_document(doc_id: str, passages: Sequence[Passage], stored: set[str]) -> Change:
    new_ids = {p.id for p in passages}
    if stored == new_ids:
        return Change(doc_id, "unchanged", len(passages), [], [])
    return Change(
        doc_id,
        "updated" if stored else "created",
        len(passages),
        [p for p in passages if p.id not in stored],
        sorted(stored - new_ids),
    )


def plan_changes(
    batch: Iterable[tuple[Document, Sequence[Passage]]], stored: dict[str, set[str]]
) -> list[Change]:
    """One :class:`Change` per document; ``stored`` maps doc id → stored passage ids."""
    return [plan_document(doc.id, passages, stored.get(doc.id, set())) for doc, passages in batch]


def write_plan(
    store: MilvusStore,
    todo: Sequence[Passage],
    vectors: np.ndarray,
    stale: Sequence[str],
    limit: int,
) -> None:
    """New passages first (in slices of at most ``limit`` rows: one huge document never makes one
    huge RPC), then the stale ones: a document is never left with no passages stored."""
    for i in range(0, len(todo), limit):
        store.upsert(todo[i : i + limit], vectors[i : i + limit])
    store.delete(stale)
