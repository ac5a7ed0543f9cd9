"""Milvus searches of a :class:`~pipeline.store.milvus.MilvusStore`: dense, BM25 and hybrid.

Each runs through the store's connection (one deadline per call) and turns Milvus's answer into
``Hit``s with larger-is-better scores: Milvus Lite returns BM25 as a negative distance, a server as
a positive score, and neither sign leaves this module. Hybrid fusion comes from the registry in
:mod:`pipeline.fusion`: Milvus's own ranker inside ``hybrid_search`` where the method has one,
otherwise both lists fused here by the method's formula.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.domain import Hit
from pipeline.fusion import FusionParams
from pipeline.fusion import fusion as fusion_method
from pipeline.store.errors import InvalidFilter, StoreError

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from pipeline.store.connection import MilvusConnection

OUTPUT_FIELDS = ["doc_id", "chunk", "title", "text", "metadata"]


class SearchedStore(Protocol):
    """What these searches read of a :class:`~pipeline.store.milvus.MilvusStore` (a protocol:
    milvus.py calls this module, so this module does not import it back)."""

    collection: str
    consistency: str
    fusion: str
    conn: MilvusConnection
    hnsw_ef: int

    @property
    def fusion_params(self) -> FusionParams: ...

    def ensure_loaded(self, c: MilvusClient, t: Callable[[], float]) -> None: ...


def hits(raw: Any, *, bm25: bool = False) -> list[Hit]:
    out: list[Hit] = []
    for h in raw[0] if raw else []:
        e = h.get("entity", {})
        score = float(h["distance"])
        out.append(
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
    return out


def _guarded(
    store: SearchedStore, fn: Callable[[MilvusClient, Callable[[], float]], Any], filter: str
) -> Any:
    """Run a search; Milvus refusing it is the caller's filter (InvalidFilter) when there is one."""
    from pymilvus.exceptions import MilvusException

    try:
        return store.conn.call(fn)
    except MilvusException as exc:
        if filter:
            msg = getattr(exc, "message", None) or str(exc)
            raise InvalidFilter(f"invalid filter expression: {msg}", filter) from exc
        raise StoreError("Milvus rejected the search") from exc


def dense_params(store: SearchedStore, k: int) -> dict[str, Any]:
    return {"metric_type": "COSINE", "params": {"ef": max(store.hnsw_ef, k)}}


def dense(store: SearchedStore, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
    def run(c: MilvusClient, t: Callable[[], float]) -> Any:
        store.ensure_loaded(c, t)
        return c.search(
            store.collection,
            data=[np.asarray(vector, dtype=np.float32).tolist()],
            anns_field="dense",
            limit=k,
            filter=filter,
            output_fields=OUTPUT_FIELDS,
            search_params=dense_params(store, k),
            consistency_level=store.consistency,
            timeout=t(),
        )

    return hits(_guarded(store, run, filter))


def bm25(store: SearchedStore, text: str, k: int, filter: str = "") -> list[Hit]:
    def run(c: MilvusClient, t: Callable[[], float]) -> Any:
        store.ensure_loaded(c, t)
        return c.search(
            store.collection,
            data=[text],
            anns_field="sparse",
            limit=k,
            filter=filter,
            output_fields=OUTPUT_FIELDS,
            search_params={"metric_type": "BM25"},
            consistency_level=store.consistency,
            timeout=t(),
        )

    return hits(_guarded(store, run, filter), bm25=True)


def ranker(store: SearchedStore) -> Any:
    """The Milvus ranker of ``hybrid_search`` for the store's fusion setting (the registry's)."""
    method = fusion_method(store.fusion)
    if method.milvus_ranker is None:
        raise ValueError(f"fusion {store.fusion!r} is not done by a Milvus ranker")
    return method.milvus_ranker(store.fusion_params)


def hybrid(
    store: SearchedStore, vector: np.ndarray, text: str, k: int, filter: str = ""
) -> list[Hit]:
    """Dense + BM25 fused by the store's fusion: Milvus's ranker, or both lists fused here.

    ``normalized`` needs each list's own minimum and maximum, which no Milvus ranker has
    (see :mod:`pipeline.fusion`): it runs the two searches and fuses their hits.
    """
    if not text.strip():
        return dense(store, vector, k, filter)
    method = fusion_method(store.fusion)
    if method.milvus_ranker is None:
        return method.fuse(
            dense(store, vector, k, filter),
            bm25(store, text, k, filter),
            store.fusion_params,
            k,
        )
    from pymilvus import AnnSearchRequest

    milvus_ranker = method.milvus_ranker(store.fusion_params)

    def run(c: MilvusClient, t: Callable[[], float]) -> Any:
        store.ensure_loaded(c, t)
        reqs = [
            AnnSearchRequest(
                data=[np.asarray(vector, dtype=np.float32).tolist()],
                anns_field="dense",
                param=dense_params(store, k),
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
            store.collection,
            reqs,
            ranker=milvus_ranker,
            limit=k,
            output_fields=OUTPUT_FIELDS,
            consistency_level=store.consistency,
            timeout=t(),
        )

    return hits(_guarded(store, run, filter))
