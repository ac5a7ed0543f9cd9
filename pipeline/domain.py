"""Domain types shared by ingest, the store and search: no Milvus, no torch, no I/O.

``ingest`` and ``pipeline.search`` import these without pulling in the Milvus adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# what the collection's schema can hold (the store's field sizes; documents are checked against them)
MAX_DOC_ID_BYTES = 512
MAX_TITLE_BYTES = 2048


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


def _has_surrogate(text: str) -> int | None:
    """Position of the first lone UTF-16 surrogate in ``text`` (None: it is valid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def invalid_unicode_at(value: Any, where: str = "") -> str | None:
    """Where (``documents[3]``, ``metadata.lang``) the first string that is not valid Unicode sits.

    A JSON text may carry ``"\\ud800"``: a lone surrogate, which Python decodes into a ``str`` that
    no tokenizer, hash or JSON encoder downstream accepts. The API (every request body) and ingest
    (every record) call this one check and refuse the value, naming where it is; None means valid.
    """
    if isinstance(value, str):
        at = _has_surrogate(value)
        return None if at is None else f"{where or 'value'} (character {at})"
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and _has_surrogate(k) is not None:
                return f"a key of {where or 'the object'}"  # never quote the bad key itself
            found = invalid_unicode_at(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = invalid_unicode_at(v, f"{where}[{i}]")
            if found:
                return found
    return None
