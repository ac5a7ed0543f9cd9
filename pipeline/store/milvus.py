"""MilvusStore: one collection of passages with a dense HNSW index and a BM25 sparse index.

The same code serves Milvus Lite (a ``.db`` path, embedded) and a Milvus server
(``http://host:19530``). This module is the collection logic: schema, indexes, writes and reads.
Every RPC runs through :class:`~pipeline.store.connection.MilvusConnection` (one deadline per call,
reconnects, the circuit breaker); searches live in :mod:`pipeline.store.search`, Milvus Lite's
quirks in :mod:`pipeline.store.lite`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.domain import MAX_DOC_ID_BYTES, MAX_TITLE_BYTES, Hit, Passage
from pipeline.store import lite, search
from pipeline.store.base import VectorStore
from pipeline.store.connection import MAX_INFLIGHT, MilvusConnection
from pipeline.store.filters import in_list, quote

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from pipeline.breaker import Breaker
    from pipeline.config import StoreSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

PROP_MODEL = "winnow.embed_model"
PROP_DIM = "winnow.dim"
ID_LEN = 40
MAX_TEXT_BYTES = 65535
# creating a collection with its indexes, flushing, dropping: ingest-side work that a busy
# Milvus may legitimately take longer than a query's deadline for; still bounded
SLOW_OP_TIMEOUT = 120.0

ANALYZERS: dict[str, dict[str, Any]] = {
    "standard": {
        "tokenizer": "standard",
        "filter": ["lowercase", {"type": "stop", "stop_words": ["_english_"]}],
    },
    "english": {"type": "english"},
    "jieba": {"tokenizer": "jieba", "filter": ["lowercase"]},
}


def clip_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


class MilvusStore(VectorStore):
    """The store contract (:class:`~pipeline.store.base.VectorStore`) over Milvus.

    Every call runs under one deadline (``timeout``, i.e. WINNOW_MILVUS_TIMEOUT) that covers the
    (re)connect and each RPC it makes and holds at the caller (``conn``, see
    :mod:`pipeline.store.connection`); a hung Milvus turns into ``StoreUnavailable`` within it.
    """

    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        analyzer: str = "standard",
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 200,
        hnsw_ef: int = 200,
        rrf_k: int = 5,
        fusion: str = "rrf",
        fusion_weights: tuple[float, float] = (0.5, 0.5),
        max_inflight: int = MAX_INFLIGHT,
        breaker_failures: int = 3,
        breaker_cooldown: float = 2.0,
        consistency: str = "Session",
    ) -> None:
        super().__init__(
            collection,
            fusion=fusion,
            rrf_k=rrf_k,
            fusion_weights=fusion_weights,
            consistency=consistency,
        )
        self.uri = uri
        self.timeout = timeout
        self.analyzer = analyzer
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef = hnsw_ef
        self.is_lite = lite.is_lite(uri)
        if analyzer == "jieba" and self.is_lite:
            lite.quiet_jieba()
        self.conn = MilvusConnection(
            uri,
            probe_collection=collection,
            token=token,
            timeout=timeout,
            max_inflight=max_inflight,
            breaker_failures=breaker_failures,
            breaker_cooldown=breaker_cooldown,
        )

    @property
    def slow_timeout(self) -> float:
        """Deadline of create/flush/drop (never shorter than a query's)."""
        return max(self.timeout, SLOW_OP_TIMEOUT)

    @property
    def lite_path(self) -> Path:
        return lite.lite_path(self.uri)

    @property
    def breaker(self) -> Breaker:
        return self.conn.breaker

    @classmethod
    def from_settings(cls, s: StoreSettings, collection: str | None = None) -> MilvusStore:
        """The store as its settings group says (``settings.store``)."""
        return cls(
            s.milvus_uri,
            collection if collection is not None else s.collection,
            token=s.milvus_token.get_secret_value() if s.milvus_token else None,
            timeout=s.milvus_timeout,
            analyzer=s.analyzer,
            hnsw_m=s.hnsw_m,
            hnsw_ef_construction=s.hnsw_ef_construction,
            hnsw_ef=s.hnsw_ef,
            rrf_k=s.rrf_k,
            fusion=s.fusion,
            fusion_weights=(s.fusion_dense_weight, s.fusion_bm25_weight),
            max_inflight=s.milvus_max_inflight,
            breaker_failures=s.milvus_breaker_failures,
            breaker_cooldown=s.milvus_breaker_cooldown,
            consistency=s.read_consistency,
        )

    # --- the connection's deadline layer, health and counters ------------------------------
    async def arun(self, method: Callable[..., T], *args: Any) -> T:
        return await self.conn.arun(method, *args)

    def raise_if_open(self) -> None:
        self.conn.raise_if_open()

    def ping(self) -> bool:
        return self.conn.ping()

    async def aping(self) -> bool:
        return await self.conn.aping()

    def stats(self) -> dict[str, int]:
        return self.conn.stats()

    def close(self) -> None:
        self.conn.close()

    # --- schema ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.conn.call(lambda c, t: c.has_collection(self.collection, timeout=t())))

    def _schema(self, dim: int) -> Any:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LEN)
        s.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID_BYTES)
        s.add_field("chunk", DataType.INT64)
        s.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
        s.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        s.add_field(
            "search_text",
            DataType.VARCHAR,
            max_length=MAX_TEXT_BYTES,
            enable_analyzer=True,
            analyzer_params=ANALYZERS[self.analyzer],
        )
        s.add_field("metadata", DataType.JSON)
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["search_text"],
                output_field_names=["sparse"],
            )
        )
        return s

    def ensure_collection(self, dim: int, model: str) -> None:
        """Create the collection, or open it after checking it was built by the same model."""

        def run(c: MilvusClient, t: Callable[[], float]) -> None:
            if c.has_collection(self.collection, timeout=t()):
                props = (
                    c.describe_collection(self.collection, timeout=t()).get("properties", {}) or {}
                )
                have_dim = props.get(PROP_DIM)
                self.check_model(
                    props.get(PROP_MODEL), int(have_dim) if have_dim else None, model, dim
                )
            else:
                idx = c.prepare_index_params()
                idx.add_index(
                    "dense",
                    index_type="HNSW",
                    metric_type="COSINE",
                    params={"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction},
                )
                idx.add_index(
                    "sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25", params={}
                )
                c.create_collection(
                    self.collection,
                    schema=self._schema(dim),
                    index_params=idx,
                    properties={PROP_MODEL: model, PROP_DIM: str(dim)},
                    timeout=t(),
                )
                log.info("created collection %s (dim %d, model %s)", self.collection, dim, model)
            c.load_collection(self.collection, timeout=t())
            self.conn.loaded = True
            self.model, self.dim = model, dim

        self.conn.call(run, timeout=self.slow_timeout)

    def open(self) -> tuple[str | None, int | None]:
        """Open an existing collection for search; returns the (model, dim) it was built with."""

        def run(c: MilvusClient, t: Callable[[], float]) -> tuple[str | None, int | None]:
            if not c.has_collection(self.collection, timeout=t()):
                return None, None
            props = c.describe_collection(self.collection, timeout=t()).get("properties", {}) or {}
            c.load_collection(self.collection, timeout=t())
            self.conn.loaded = True
            dim = props.get(PROP_DIM)
            self.model, self.dim = props.get(PROP_MODEL), int(dim) if dim else None
            return self.model, self.dim

        return self.conn.call(run)

    def ensure_loaded(self, c: MilvusClient, t: Callable[[], float]) -> None:
        """Load the collection once per connection (a reopened one starts released)."""
        if not self.conn.loaded:
            c.load_collection(self.collection, timeout=t())
            self.conn.loaded = True

    def drop(self) -> None:
        self.conn.call(
            lambda c, t: c.drop_collection(self.collection, timeout=t()), timeout=self.slow_timeout
        )

    # --- writes ----------------------------------------------------------------------------
    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        if len(passages) != len(vectors):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")
        if not passages:
            return 0
        rows = [
            {
                "id": p.id,
                "doc_id": p.doc_id,
                "chunk": p.chunk,
                "title": clip_utf8(p.title, MAX_TITLE_BYTES),
                "text": clip_utf8(p.text, MAX_TEXT_BYTES),
                "search_text": clip_utf8(p.search_text, MAX_TEXT_BYTES),
                "metadata": p.metadata,
                "dense": v.tolist(),
            }
            for p, v in zip(passages, np.asarray(vectors, dtype=np.float32), strict=True)
        ]
        res = self.conn.call(lambda c, t: c.upsert(self.collection, rows, timeout=t()))
        return int(res.get("upsert_count", len(rows)) if isinstance(res, dict) else len(rows))

    def ids_by_doc(self, doc_ids: Sequence[str]) -> dict[str, set[str]]:
        """Stored passage ids of these documents (what resume and change detection compare)."""
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if not doc_ids:
            return out

        def run(c: MilvusClient, t: Callable[[], float]) -> list[dict[str, Any]]:
            self.ensure_loaded(c, t)
            return list(
                c.query(
                    self.collection,
                    filter=in_list("doc_id", doc_ids),
                    output_fields=["doc_id"],
                    consistency_level="Strong",  # a plan must see every write before it
                    timeout=t(),
                )
            )

        for row in self.conn.call(run):
            out.setdefault(row["doc_id"], set()).add(row["id"])
        return out

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.conn.call(
                lambda c, t: c.delete(self.collection, filter=in_list("id", ids), timeout=t())
            )

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        if doc_ids:
            flt = in_list("doc_id", doc_ids)
            self.conn.call(lambda c, t: c.delete(self.collection, filter=flt, timeout=t()))

    def flush(self) -> None:
        self.conn.call(
            lambda c, t: c.flush(self.collection, timeout=t()), timeout=self.slow_timeout
        )

    def count(self, filter: str = "") -> int:
        """Passages stored (``filter``: those matching it; ``chunk == 0`` counts documents)."""

        def run(c: MilvusClient, t: Callable[[], float]) -> int:
            self.ensure_loaded(c, t)
            res = c.query(
                self.collection,
                filter=filter,
                output_fields=["count(*)"],
                consistency_level=self.consistency,
                timeout=t(),
            )
            return int(res[0]["count(*)"])

        return self.conn.call(run)

    def passages_of(self, doc_id: str, limit: int) -> list[Hit]:
        """A document's stored passages in chunk order (score 0), at most ``limit``."""

        def run(c: MilvusClient, t: Callable[[], float]) -> list[dict[str, Any]]:
            self.ensure_loaded(c, t)
            return list(
                c.query(
                    self.collection,
                    filter=f"doc_id == {quote(doc_id)}",
                    output_fields=search.OUTPUT_FIELDS,
                    limit=limit,
                    consistency_level=self.consistency,
                    timeout=t(),
                )
            )

        rows = self.conn.call(run)
        hits = [
            Hit(
                id=str(r["id"]),
                doc_id=r["doc_id"],
                chunk=int(r["chunk"]),
                title=r.get("title", ""),
                text=r.get("text", ""),
                metadata=r.get("metadata") or {},
                score=0.0,
            )
            for r in rows
        ]
        return sorted(hits, key=lambda h: (h.chunk, h.id))

    # --- search (pipeline.store.search) ----------------------------------------------------
    def dense(self, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
        return search.dense(self, vector, k, filter)

    def bm25(self, text: str, k: int, filter: str = "") -> list[Hit]:
        return search.bm25(self, text, k, filter)

    def ranker(self) -> Any:
        """The Milvus ranker of ``hybrid_search`` for this store's fusion setting."""
        return search.ranker(self)

    def hybrid(self, vector: np.ndarray, text: str, k: int, filter: str = "") -> list[Hit]:
        return search.hybrid(self, vector, text, k, filter)
