"""MilvusStore: one collection of passages with a dense HNSW index and a BM25 sparse index.

The same code serves Milvus Lite (a ``.db`` path, embedded) and a Milvus server (``http://host:19530``).
Differences between the two (Lite's negative BM25 distances) are normalised here and never leak out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.domain import Hit, Passage

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from pipeline.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

PROP_MODEL = "winnow.embed_model"
PROP_DIM = "winnow.dim"
ID_LEN = 40
MAX_DOC_ID_BYTES = 512
MAX_TITLE_BYTES = 2048
MAX_TEXT_BYTES = 65535
OUTPUT_FIELDS = ["doc_id", "chunk", "title", "text", "metadata"]

ANALYZERS: dict[str, dict[str, Any]] = {
    "standard": {
        "tokenizer": "standard",
        "filter": ["lowercase", {"type": "stop", "stop_words": ["_english_"]}],
    },
    "english": {"type": "english"},
    "jieba": {"tokenizer": "jieba", "filter": ["lowercase"]},
}


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """Milvus cannot be reached (or timed out); the service answers 503 and retries later."""


class SchemaMismatch(StoreError):
    """The collection was built with another embedding model or dimension."""


class InvalidFilter(StoreError, ValueError):
    """The caller's filter expression was rejected by Milvus."""


def quote(value: str) -> str:
    """A Milvus string literal (Milvus Lite has no filter templating)."""
    return json.dumps(value, ensure_ascii=False)


def in_list(field_name: str, values: Iterable[str]) -> str:
    return f"{field_name} in [{','.join(quote(v) for v in values)}]"


def clip_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


def _is_unavailable(exc: BaseException) -> bool:
    from pymilvus.exceptions import MilvusException, MilvusUnavailableException

    if isinstance(exc, MilvusUnavailableException | TimeoutError | ConnectionError):
        return True
    try:
        import grpc

        if isinstance(exc, grpc.RpcError):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MilvusException):
        msg = str(getattr(exc, "message", "") or exc).lower()
        return any(
            s in msg
            for s in (
                "unavailable",
                "deadline",
                "connect",
                "timed out",
                "timeout",
                "closed channel",
            )
        )
    return False


class MilvusStore:
    """Thread-safe wrapper over ``MilvusClient``; reconnects by itself after Milvus comes back."""

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
        rrf_k: int = 60,
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.token = token
        self.timeout = timeout
        self.analyzer = analyzer
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef = hnsw_ef
        self.rrf_k = rrf_k
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "grpc://"))
        self._client: MilvusClient | None = None
        self._lock = threading.RLock()
        self._loaded = False
        self.model: str | None = None
        self.dim: int | None = None

    @classmethod
    def from_settings(cls, s: Settings, collection: str | None = None) -> MilvusStore:
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
        )

    # --- connection ------------------------------------------------------------------------
    def _connect(self) -> MilvusClient:
        from pymilvus import MilvusClient

        if self.is_lite:
            Path(self.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": self.timeout}
        if self.token:
            kwargs["token"] = self.token
        return MilvusClient(**kwargs)

    def _call(self, fn: Callable[[MilvusClient], T]) -> T:
        """Run one client call; connection failures become StoreUnavailable and drop the client."""
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._connect()
                    self._loaded = False
                return fn(self._client)
            except StoreError:
                raise
            except Exception as exc:
                if _is_unavailable(exc):
                    self._drop_client()
                    raise StoreUnavailable(f"Milvus at {self.uri} is not reachable") from exc
                raise

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._loaded = False
        if client is not None:
            with contextlib.suppress(Exception):  # a broken connection has nothing to release
                client.close()

    def close(self) -> None:
        with self._lock:
            self._drop_client()

    def ping(self) -> bool:
        """True when Milvus answers (used by /ready)."""
        try:
            self._call(lambda c: c.has_collection(self.collection, timeout=self.timeout))
        except StoreError:
            return False
        return True

    # --- schema ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._call(lambda c: c.has_collection(self.collection)))

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

        def run(c: MilvusClient) -> None:
            if c.has_collection(self.collection):
                props = c.describe_collection(self.collection).get("properties", {}) or {}
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
                )
                log.info("created collection %s (dim %d, model %s)", self.collection, dim, model)
            c.load_collection(self.collection)
            self._loaded = True
            self.model, self.dim = model, dim

        self._call(run)

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

    def open(self) -> tuple[str | None, int | None]:
        """Open an existing collection for search; returns the (model, dim) it was built with."""

        def run(c: MilvusClient) -> tuple[str | None, int | None]:
            if not c.has_collection(self.collection):
                return None, None
            props = c.describe_collection(self.collection).get("properties", {}) or {}
            c.load_collection(self.collection)
            self._loaded = True
            dim = props.get(PROP_DIM)
            self.model, self.dim = props.get(PROP_MODEL), int(dim) if dim else None
            return self.model, self.dim

        return self._call(run)

    def _ensure_loaded(self, c: MilvusClient) -> None:
        if not self._loaded:
            c.load_collection(self.collection)
            self._loaded = True

    def drop(self) -> None:
        self._call(lambda c: c.drop_collection(self.collection))

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
        res = self._call(lambda c: c.upsert(self.collection, rows))
        return int(res.get("upsert_count", len(rows)) if isinstance(res, dict) else len(rows))

    def ids_by_doc(self, doc_ids: Sequence[str]) -> dict[str, set[str]]:
        """Stored passage ids of these documents (what resume and change detection compare)."""
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if not doc_ids:
            return out

        def run(c: MilvusClient) -> list[dict[str, Any]]:
            self._ensure_loaded(c)
            return list(
                c.query(
                    self.collection, filter=in_list("doc_id", doc_ids), output_fields=["doc_id"]
                )
            )

        for row in self._call(run):
            out.setdefault(row["doc_id"], set()).add(row["id"])
        return out

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._call(lambda c: c.delete(self.collection, filter=in_list("id", ids)))

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        if doc_ids:
            self._call(lambda c: c.delete(self.collection, filter=in_list("doc_id", doc_ids)))

    def flush(self) -> None:
        self._call(lambda c: c.flush(self.collection))

    def count(self) -> int:
        def run(c: MilvusClient) -> int:
            self._ensure_loaded(c)
            res = c.query(self.collection, filter="", output_fields=["count(*)"])
            return int(res[0]["count(*)"])

        return self._call(run)

    # --- reads -----------------------------------------------------------------------------
    @staticmethod
    def _hits(raw: Any, *, bm25: bool = False) -> list[Hit]:
        hits: list[Hit] = []
        for h in raw[0] if raw else []:
            e = h.get("entity", {})
            score = float(h["distance"])
            hits.append(
                Hit(
                    id=str(h["id"]),
                    doc_id=e.get("doc_id", ""),
                    chunk=int(e.get("chunk", 0)),
                    title=e.get("title", ""),
                    text=e.get("text", ""),
                    metadata=e.get("metadata") or {},
                    # Milvus Lite returns BM25 as a negative distance, a server as a positive score
                    score=abs(score) if bm25 else score,
                )
            )
        return hits

    def _guard_filter(self, fn: Callable[[MilvusClient], Any], filter: str) -> Any:
        from pymilvus.exceptions import MilvusException

        try:
            return self._call(fn)
        except MilvusException as exc:
            if filter:
                msg = getattr(exc, "message", None) or str(exc)
                raise InvalidFilter(f"invalid filter expression {filter!r}: {msg}") from exc
            raise StoreError("Milvus rejected the search") from exc

    def _dense_params(self, k: int) -> dict[str, Any]:
        return {"metric_type": "COSINE", "params": {"ef": max(self.hnsw_ef, k)}}

    def search(self, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
        def run(c: MilvusClient) -> Any:
            self._ensure_loaded(c)
            return c.search(
                self.collection,
                data=[np.asarray(vector, dtype=np.float32).tolist()],
                anns_field="dense",
                limit=k,
                filter=filter,
                output_fields=OUTPUT_FIELDS,
                search_params=self._dense_params(k),
            )

        return self._hits(self._guard_filter(run, filter))

    def bm25(self, text: str, k: int, filter: str = "") -> list[Hit]:
        def run(c: MilvusClient) -> Any:
            self._ensure_loaded(c)
            return c.search(
                self.collection,
                data=[text],
                anns_field="sparse",
                limit=k,
                filter=filter,
                output_fields=OUTPUT_FIELDS,
                search_params={"metric_type": "BM25"},
            )

        return self._hits(self._guard_filter(run, filter), bm25=True)

    def hybrid(self, vector: np.ndarray, text: str, k: int, filter: str = "") -> list[Hit]:
        """Dense + BM25 fused by reciprocal rank (rank-based, so BM25's sign does not matter)."""
        from pymilvus import AnnSearchRequest, RRFRanker

        def run(c: MilvusClient) -> Any:
            self._ensure_loaded(c)
            reqs = [
                AnnSearchRequest(
                    data=[np.asarray(vector, dtype=np.float32).tolist()],
                    anns_field="dense",
                    param=self._dense_params(k),
                    limit=k,
                    expr=filter or None,
                ),
                AnnSearchRequest(
                    data=[text],
                    anns_field="sparse",
                    param={"metric_type": "BM25"},
                    limit=k,
                    expr=filter or None,
                ),
            ]
            return c.hybrid_search(
                self.collection,
                reqs,
                ranker=RRFRanker(self.rrf_k),
                limit=k,
                output_fields=OUTPUT_FIELDS,
            )

        if not text.strip():
            return self.search(vector, k, filter)
        return self._hits(self._guard_filter(run, filter))
