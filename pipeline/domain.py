"""Domain types shared by ingest, the store and search: no Milvus, no torch, no I/O.

``ingest`` and ``pipeline.search`` import these without pulling in the Milvus adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def passage_id(doc_id: str, chunk: int, text: str, title: str = "", metadata: Any = None) -> str:
    """Stable id of a passage: re-ingesting the same content upserts instead of duplicating."""
    meta = json.dumps(metadata, sort_keys=True, ensure_ascii=False) if metadata else ""
    h = hashlib.sha1(usedforsecurity=False)
    for part in (doc_id, str(chunk), title, meta, text):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Document:
    """One whole document as a user gives it (a corpus record, or a POST /v1/documents item)."""

    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True, slots=True)
class Passage:
    """One chunk of a document, as stored."""

    doc_id: str
    chunk: int
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return passage_id(self.doc_id, self.chunk, self.text, self.title, self.metadata)

    @property
    def search_text(self) -> str:
        """What is embedded and BM25-indexed: the title travels with every passage."""
        return join_title(self.title, self.text)


def join_title(title: str, text: str) -> str:
    return f"{title}\n{text}" if title else text


@dataclass(slots=True)
class Hit:
    """A recalled passage; ``score`` is cosine (dense), BM25 (sparse) or fused (hybrid), larger = better."""

    id: str
    doc_id: str
    chunk: int
    title: str
    text: str
    metadata: dict[str, Any]
    score: float
