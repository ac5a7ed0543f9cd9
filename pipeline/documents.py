"""The rules of a write, shared by the ingest job and the write API: plan, then write in order.

Passage ids are a hash of their content (:func:`pipeline.domain.passage_id`), so:

- a document whose stored passage ids equal its computed ones is **unchanged**: skipped, never embedded;
- otherwise only passages not already stored are embedded and upserted (**created** when nothing was
  stored, **updated** when something was), and the stored ids it no longer has are **stale**;
- stale passages are deleted only *after* the new ones are written, so a document never has none.

Planning is pure (no I/O); :func:`write_plan` is the one write order both callers use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.domain import MAX_DOC_ID_BYTES, MAX_TITLE_BYTES, Document, Passage, invalid_unicode_at

if TYPE_CHECKING:
    import numpy as np

    from pipeline.store import VectorStore

Status = Literal["created", "updated", "unchanged"]

MAX_METADATA_BYTES = 65536
INT64 = (-(2**63), 2**63 - 1)


def _big_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not INT64[0] <= value <= INT64[1]
    if isinstance(value, dict):
        return any(_big_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_big_int(v) for v in value)
    return False


def check_document(doc: Document) -> str | None:
    """Why this document cannot be stored (the reason a user reads), or None.

    The same rule for the ingest job (a problem, skipped) and the write API (rejected): a document
    Milvus would refuse never reaches it, where it would fail its whole batch.
    """
    fields = {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata}
    bad = invalid_unicode_at(fields)
    if bad is not None:
        return f"{bad} is not valid Unicode (it holds a lone surrogate)"
    if not doc.id.strip():
        return "id is empty"
    if len(doc.id.encode("utf-8")) > MAX_DOC_ID_BYTES:
        return f"id is over {MAX_DOC_ID_BYTES} bytes (UTF-8)"
    if not doc.text.strip():
        return "text is empty"
    if len(doc.title.encode("utf-8")) > MAX_TITLE_BYTES:
        return f"title is over {MAX_TITLE_BYTES} bytes (UTF-8)"
    if doc.metadata:
        try:
            size = len(json.dumps(doc.metadata, ensure_ascii=False, allow_nan=False).encode())
        except (UnicodeEncodeError, ValueError, TypeError):
            return "metadata is not plain JSON (lone surrogates, NaN or infinity)"
        if size > MAX_METADATA_BYTES:
            return f"metadata is over {MAX_METADATA_BYTES} bytes as JSON"
        if _big_int(doc.metadata):
            return "metadata holds an integer that does not fit in 64 bits"
    return None


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
    store: VectorStore,
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
