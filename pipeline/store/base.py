"""The store contract: what search, writes, ingest, the API state and evaluation use of a store.

One collection of passages, searched dense (the collection's metric, COSINE), by BM25 keywords, or
hybrid (both lists fused by a method of :mod:`pipeline.fusion`). :class:`MilvusStore
<pipeline.store.milvus.MilvusStore>` is the product's one implementation (Milvus Lite or a
server); ``testkit/memory_store.py`` is the test double, which passes the same contract tests
(``tests/test_store_contract.py``). Optional capabilities (deadline layer, breaker, health,
counters, flushing) are methods with defaults here, never probed with ``getattr``.

Semantics every store keeps:
- ``upsert`` is idempotent by passage id (the id is a content hash); ``delete``/``delete_docs`` of
  unknown ids do nothing;
- ``filter`` is a Milvus boolean expression (``pipeline.store.filters``); one a store rejects is
  :class:`InvalidFilter`;
- scores are larger-is-better for every mode (BM25 positive), ties broken by passage id;
- reads see every write made before them by this process (Session consistency or stronger);
  ``ids_by_doc`` (what plans a write) always reads Strong;
- a collection built by another embedding model is refused (:meth:`check_model`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from pipeline.domain import Hit, Passage
from pipeline.fusion import FusionParams
from pipeline.fusion import fusion as fusion_method
from pipeline.store.errors import SchemaMismatch

T = TypeVar("T")


class VectorStore(ABC):
    """A collection of passages with dense, BM25 and hybrid search (see the module docstring)."""

    uri: str = ""
    # a store whose unflushed rows slow every BM25 query (Milvus Lite): writers flush it often,
    # and Ray's workers may not open it (one process per file)
    is_lite: bool = False

    def __init__(
        self,
        collection: str,
        *,
        fusion: str = "rrf",
        rrf_k: int = 5,
        fusion_weights: tuple[float, float] = (0.5, 0.5),
        consistency: str = "Session",
    ) -> None:
        self.collection = collection
        fusion_method(fusion)  # ValueError naming the choices
        self.fusion = fusion
        self.rrf_k = rrf_k
        self.fusion_weights = fusion_weights
        self.consistency = consistency  # of searches; reads that plan a write are always Strong
        self.model: str | None = None  # the embedding model and dimension that built the collection
        self.dim: int | None = None

    # --- collection ------------------------------------------------------------------------
    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def open(self) -> tuple[str | None, int | None]:
        """Open an existing collection for search: the (model, dim) that built it, (None, None)
        when there is none."""

    @abstractmethod
    def ensure_collection(self, dim: int, model: str) -> None:
        """Create the collection, or open it after checking it was built by the same model."""

    @abstractmethod
    def drop(self) -> None: ...

    def check_model(
        self, have_model: str | None, have_dim: int | None, model: str, dim: int
    ) -> None:
        """The one mismatch rule: a collection is only used with the embedder that built it."""
        if have_model is not None and (have_model != model or have_dim != dim):
            raise SchemaMismatch(
                f"collection {self.collection!r} was built with embedding model "
                f"{have_model!r} (dim {have_dim}); this run uses {model!r} (dim {dim}). "
                "Use the same WINNOW_EMBED_MODEL, or another WINNOW_COLLECTION "
                "(or drop the collection and re-ingest)."
            )

    # --- writes ----------------------------------------------------------------------------
    @abstractmethod
    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        """Insert or replace by passage id; the number of rows written. ValueError when the
        counts of passages and vectors differ."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None: ...

    @abstractmethod
    def delete_docs(self, doc_ids: Sequence[str]) -> None: ...

    def flush(self) -> None:
        """Make writes durable and indexed (Milvus: seal the memtable). Nothing to do by default."""
        return None

    # --- reads -----------------------------------------------------------------------------
    @abstractmethod
    def ids_by_doc(self, doc_ids: Sequence[str]) -> dict[str, set[str]]:
        """Stored passage ids of these documents (Strong: what resume and change detection use)."""

    @abstractmethod
    def passages_of(self, doc_id: str, limit: int) -> list[Hit]:
        """A document's stored passages in chunk order (score 0), at most ``limit``."""

    @abstractmethod
    def count(self, filter: str = "") -> int:
        """Passages stored (``filter``: those matching it; ``chunk == 0`` counts documents)."""

    def count_documents(self) -> int:
        """Documents stored: each has exactly one first passage (during a change of its first
        passage's text, old and new are both stored for a moment and it counts twice)."""
        return self.count("chunk == 0")

    # --- search ----------------------------------------------------------------------------
    @abstractmethod
    def dense(self, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
        """The ``k`` nearest passages by the collection's metric (COSINE), best first."""

    @abstractmethod
    def bm25(self, text: str, k: int, filter: str = "") -> list[Hit]:
        """The ``k`` best BM25 matches of ``text`` (positive scores), best first."""

    @property
    def fusion_params(self) -> FusionParams:
        return FusionParams(rrf_k=self.rrf_k, weights=self.fusion_weights)

    def hybrid(self, vector: np.ndarray, text: str, k: int, filter: str = "") -> list[Hit]:
        """Dense + BM25 (``k`` each) fused by this store's fusion method; dense alone for an
        empty text. By default both lists are fetched and fused here by the registry's formula."""
        if not text.strip():
            return self.dense(vector, k, filter)
        method = fusion_method(self.fusion)
        return method.fuse(
            self.dense(vector, k, filter), self.bm25(text, k, filter), self.fusion_params, k
        )

    # --- running calls, health and counters ------------------------------------------------
    async def arun(self, method: Callable[..., T], *args: Any) -> T:
        """``method(*args)`` (a store method) for an event loop, under the store's deadline."""
        return await asyncio.to_thread(method, *args)

    def raise_if_open(self) -> None:
        """StoreUnavailable at once when the store is known down (its circuit breaker is open),
        so a caller skips the work it would do before the call. Never by default."""
        return None

    def ping(self) -> bool:
        """Whether the store answers now (``/ready``), quickly."""
        return True

    async def aping(self) -> bool:
        return self.ping()

    def stats(self) -> dict[str, int]:
        """Counters and gauges for /metrics (the Milvus store: its breaker, calls in flight)."""
        return {}

    def close(self) -> None:
        """Release connections and threads. Nothing to release by default."""
        return None
