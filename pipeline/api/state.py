"""What the routes share: the runtime (services), metrics, readiness. Built once per app."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import gpu
from pipeline.api.errors import NotReady
from pipeline.api.metrics import Metrics
from pipeline.config import Settings
from pipeline.rerank.base import Sample
from pipeline.runtime import CollectionMissing, Runtime
from pipeline.search import SearchService
from pipeline.store import StoreError
from pipeline.writes import WriteService

ADD_HINT = (
    "the collection is empty: add documents with POST /v1/documents (a write key: "
    "WINNOW_WRITE_API_KEY), the page's Add form, or python -m ingest PATH "
    "[--server http://HOST:PORT]"
)
READY_TIMEOUT_S = 1.0
COUNT_CACHE_S = 5.0  # /ready's document count is reused this long, unless a write came since  # /ready answers within about this, whatever Milvus or a remote reranker does


@dataclass
class AppState:
    settings: Settings
    runtime: Runtime
    metrics: Metrics = field(init=False)
    started: float = field(default_factory=time.time)
    _count: int | None = field(default=None, init=False, repr=False)
    _count_at: float = field(default=-1e9, init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.stats, self.rerank_samples)

    @property
    def service(self) -> SearchService:
        """The service, once models are loaded (503 before: the lifespan is still loading them)."""
        if not self.runtime.loaded:
            raise NotReady("models are still loading")
        return self.runtime.service

    async def checked_service(self) -> SearchService:
        """The service for a recall: the collection exists and was built by this embedding model."""
        service = self.service
        await asyncio.to_thread(self.runtime.check_collection, create=True)
        return service

    async def write_service(self) -> WriteService:
        """The write use cases, once models are loaded and the collection is usable."""
        self.service  # noqa: B018 - 503 while the models load
        await asyncio.to_thread(self.runtime.check_collection, create=True)
        return self.runtime.writes

    def rerank_samples(self) -> list[Sample]:
        """The reranker's declared counters (whichever backend runs), for /metrics."""
        reranker = self.runtime.reranker
        return reranker.samples() if reranker is not None else []

    def stats(self) -> dict[str, Any]:
        """Reranker (whichever backend runs) and store counters for /metrics."""
        reranker = self.runtime.reranker
        out: dict[str, Any] = dict(reranker.stats()) if reranker is not None else {}
        out.update(self.runtime.store.stats())
        out.update(self.runtime.write_stats())
        out.update(gpu.gpu_stats())
        return out

    def _collection_state(self) -> tuple[str, int | None]:
        """ "ok" (or why not) and the documents stored; the count is reused for COUNT_CACHE_S
        (probes come often, and on a large collection a count is a scan)."""
        rt = self.runtime
        try:
            rt.check_collection(create=True)
            now = time.monotonic()
            if now - self._count_at > COUNT_CACHE_S or rt.writes_since(self._count_at):
                self._count, self._count_at = rt.store.count_documents(), now
            return "ok", self._count
        except (CollectionMissing, StoreError) as exc:
            return str(exc), None

    async def readiness(self, detail: bool = True) -> tuple[bool, dict[str, Any]]:
        """Models loaded, Milvus answering, collection usable, remote reranker healthy; ≤ ~1 s.

        ``detail=False`` (a caller without a key): no file paths — a model given as a local
        directory shows its last part, a collection problem its kind, not its message.
        """
        rt = self.runtime
        milvus = collection = documents = None
        if rt.loaded:
            milvus = await _bounded(rt.store.aping(), False)  # its own thread: never queued
            if milvus:
                collection, documents = await _bounded(
                    asyncio.to_thread(self._collection_state), ("timeout", None)
                )
        reranker = rt.reranker
        rerank_ok = True
        if reranker is not None:
            rerank_ok = bool(await _bounded(reranker.health(), False))
        ok = bool(rt.loaded and milvus and rerank_ok)
        body = {
            "ready": ok,
            "models_loaded": rt.loaded,
            "milvus": bool(milvus),
            "collection": collection,
            "rerank": reranker is not None,
            "rerank_ready": rerank_ok if reranker is not None else None,
            "rerank_backend": reranker.backend if reranker is not None else None,
            "rerank_model": reranker.model if reranker is not None else None,
            "embed_model": self.settings.embed_model,
            "documents": documents,
            "writes": self.settings.writes_enabled,
            "hint": ADD_HINT if documents == 0 else None,
            "gpu": gpu.gpu_summary(),
        }
        if not detail:
            body["rerank_model"] = public_name(body["rerank_model"])
            body["embed_model"] = public_name(body["embed_model"])
            if collection not in (None, "ok", "timeout"):
                body["collection"] = "unavailable"
        return ok, body


def public_name(model: str | None) -> str | None:
    """A model name without its directory: ``/srv/models/qwen3`` → ``qwen3``; hub ids unchanged."""
    if model is None:
        return None
    if Path(model).is_absolute() or model.startswith((".", "~")) or Path(model).exists():
        return Path(model.rstrip("/\\")).name or "local"
    return model


async def _bounded(work: Any, default: Any) -> Any:
    try:
        return await asyncio.wait_for(work, READY_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError):
        return default
