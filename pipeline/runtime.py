"""The composition root: the one place that builds Winnow's services from ``Settings``.

The API lifespan, every CLI command, the evaluator and the ingest job get their embedder, store and
reranker from here, so they load the same way, apply the same collection/model rule, and close in the same
order. Nothing else constructs these objects (tests and benchmarks aside).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import Settings

if TYPE_CHECKING:
    from pipeline.embedding import Embedder
    from pipeline.rerank.base import Reranker
    from pipeline.search import SearchService
    from pipeline.store import VectorStore
    from pipeline.writes import WriteService

log = logging.getLogger(__name__)


class CollectionMissing(RuntimeError):
    """The collection does not exist (or is empty): nothing has been ingested yet."""


def build_embedder(settings: Settings) -> Embedder:
    """The configured embedder, not yet loaded (``load()`` reads the weights)."""
    from pipeline.embedding import Embedder

    embed = settings.embed
    return Embedder(embed.embed_model, device=embed.embed_device, batch_size=embed.embed_batch_size)


def open_store(settings: Settings, collection: str | None = None) -> VectorStore:
    """A store handle on ``collection`` (default ``WINNOW_COLLECTION``); connects lazily."""
    from pipeline.store import MilvusStore

    return MilvusStore.from_settings(settings.store, collection)


def rerank_backend(settings: Settings) -> str:
    """The backend ``WINNOW_RERANK_BACKEND`` resolves to here (``auto``: vLLM on CUDA when
    installed, else hf), or ``off``."""
    if not settings.rerank:
        return "off"
    from pipeline.rerank.factory import pick_backend

    return pick_backend(settings.reranker)


# Defaults for the hf reranker on a CPU (issue 30; measured in docs/benchmarks.md "Search on a CPU"):
# a search reranks what its budget allows in about 10 s and a pair is cut at 2048 tokens, so one long
# document (8192 tokens: ~30 s on 2 cores) cannot take a whole budget. Settings a user sets win.
CPU_SEARCH_RERANK_BUDGET_MS = 10_000
CPU_RERANK_MAX_LENGTH = 2048


def machine_defaults(settings: Settings) -> Settings:
    """``settings`` with the CPU defaults above filled in where the reranker is the hf engine on a
    CPU and the user left them unset; unchanged elsewhere (GPU, vLLM, remote, reranking off)."""
    if rerank_backend(settings) != "hf":
        return settings
    from pipeline.devices import resolve_device

    if resolve_device(settings.rerank_device) != "cpu":
        return settings
    update: dict[str, int] = {}
    if "rerank_max_length" not in settings.reranker.model_fields_set:
        update["rerank_max_length"] = CPU_RERANK_MAX_LENGTH
    if "search_rerank_budget_ms" not in settings.search.model_fields_set:
        update["search_rerank_budget_ms"] = CPU_SEARCH_RERANK_BUDGET_MS
    if not update:
        return settings
    log.info("reranker on a CPU: defaults %s (set them to override)", update)
    return settings.model_copy(update=update)


def load_reranker(settings: Settings) -> Reranker | None:
    """The loaded reranker, or None when ``WINNOW_RERANK=off``; missing weights fail fast."""
    if not settings.rerank:
        return None
    from pipeline.model_files import resolve_model
    from pipeline.rerank.factory import build_reranker, pick_backend

    path = None
    if pick_backend(settings.reranker) != "remote":  # a remote reranker has no local weights
        path = resolve_model(settings.rerank_model, what="reranker", setting="WINNOW_RERANK_MODEL")
    reranker = build_reranker(settings.reranker, model_path=path)
    reranker.load()
    return reranker


@dataclass
class Runtime:
    """Embedder + store + reranker + the SearchService over them, with one close order.

    Construction is cheap; :meth:`load` loads the models (call it off the event loop). Objects passed in
    are used as they are and are not closed here (tests share one model across many runtimes).
    """

    settings: Settings
    collection: str | None = None
    embedder: Embedder = None  # type: ignore[assignment]
    store: VectorStore = None  # type: ignore[assignment]
    reranker: Reranker | None = None
    loaded: bool = False
    _owns_reranker: bool = field(default=True, repr=False)
    _collection_checked: bool = field(default=False, repr=False)
    _service: SearchService | None = field(default=None, repr=False)
    _writes: WriteService | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.settings = machine_defaults(self.settings)
        if self.embedder is None:
            self.embedder = build_embedder(self.settings)
        if self.store is None:
            self.store = open_store(self.settings, self.collection)
        if self.reranker is not None:
            self._owns_reranker = False

    @property
    def service(self) -> SearchService:
        if self._service is None:
            from pipeline.search import SearchService

            self._service = SearchService(self.settings, self.embedder, self.store, self.reranker)
        return self._service

    @property
    def writes(self) -> WriteService:
        """The write use cases (POST/DELETE /v1/documents) over the same embedder and store."""
        if self._writes is None:
            from pipeline.writes import WriteService

            self._writes = WriteService(self.settings, self.embedder, self.store)
        return self._writes

    def writes_since(self, t: float) -> bool:
        """Whether a write finished after monotonic time ``t`` (a cached count is then stale)."""
        return self._writes is not None and self._writes.last_write > t

    def write_stats(self) -> dict[str, int]:
        """The write queue's gauges for /metrics (empty until the first write)."""
        return self._writes.stats() if self._writes is not None else {}

    def load(self, *, reranker: bool = True) -> Runtime:
        """Load the embedder and (when on and not given) the reranker; idempotent."""
        self.embedder.load()
        if reranker and self.reranker is None and self.settings.rerank:
            self.reranker = load_reranker(self.settings)
            self._owns_reranker = True
            self.service.reranker = self.reranker
        self.loaded = True
        return self

    def check_collection(self, *, create: bool = False) -> None:
        """Refuse a missing collection or one built by another embedding model; cached once it passes.

        The same rule, with the same message, for the API, ``python -m pipeline search`` and the
        evaluator (the ingest job applies it when it creates or extends a collection). ``create``
        (the API): a missing collection is created empty, with the loaded embedder's dimension, so
        a new server answers searches (with no results) and takes documents through its write API.
        """
        if self._collection_checked:
            return
        model, dim = self.store.open()
        if model is None and create:
            self.store.ensure_collection(self.embedder.dim, self.settings.embed_model)
            self._collection_checked = True
            return
        if model is None:
            raise CollectionMissing(
                f"collection {self.store.collection!r} does not exist yet at "
                f"{self.settings.milvus_uri}: ingest documents first (python -m ingest PATH)"
            )
        self.store.check_model(model, dim, self.settings.embed_model, self.embedder.dim)
        self._collection_checked = True

    async def aclose(self) -> None:
        """Close in reverse order of use: reranker (drains its queue), then the store."""
        import asyncio

        if self.reranker is not None and self._owns_reranker:
            await self.reranker.aclose()
        if self._writes is not None:  # a write that has started finishes before the store closes
            await asyncio.to_thread(self._writes.close)
        await asyncio.to_thread(self.store.close)
