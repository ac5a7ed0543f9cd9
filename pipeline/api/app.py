"""FastAPI app factory: the runtime's lifespan, the edge guard, metrics, errors and the routes.

``create_app`` builds nothing itself: services come from :class:`pipeline.runtime.Runtime` (one passed in
is used as it is, so tests share loaded models across apps), routes from :mod:`pipeline.api.routes`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from pipeline import __version__
from pipeline.api import docs, errors, openapi
from pipeline.api.guard import GuardMiddleware, RequestLimit
from pipeline.api.metrics import Metrics
from pipeline.api.routes import STATIC, router
from pipeline.api.state import AppState
from pipeline.config import Settings
from pipeline.embedding import Embedder
from pipeline.rerank.base import Reranker
from pipeline.runtime import CollectionMissing, Runtime, machine_defaults
from pipeline.store import StoreError

log = logging.getLogger(__name__)
IO_THREADS = 64  # blocking Milvus/embedder calls in flight at once; each is bounded by its deadline


class MetricsMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware): no extra task per request, disconnects still visible."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    embedder: Embedder | None = None,
    reranker: Reranker | None = None,
) -> FastAPI:
    """An app over ``runtime`` (or one built from ``settings`` with the given models)."""
    settings = machine_defaults(settings if settings is not None else Settings())
    rt = runtime if runtime is not None else Runtime(settings, embedder=embedder, reranker=reranker)
    state = AppState(settings, rt)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # store and embedder calls run in the default pool: with the stock size (cores + 4) a handful
        # of requests stuck on a frozen Milvus would hold every thread and queue the rest behind them
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(IO_THREADS, thread_name_prefix="winnow-io")
        )
        await asyncio.to_thread(rt.load)
        try:
            await asyncio.to_thread(rt.check_collection, create=True)
        except (StoreError, CollectionMissing) as exc:
            log.warning("not ready yet: %s", exc)
        if rt.reranker is not None:
            log.info("reranker: %s backend, model %s", rt.reranker.backend, rt.reranker.model)
        else:
            log.warning("reranking is OFF: results are recall-only")
        yield
        await rt.aclose()

    app = FastAPI(
        title="Winnow",
        version=__version__,
        description="Two-stage semantic search: Milvus recall + Qwen3-Reranker.",
        lifespan=lifespan,
        docs_url=None,  # served by pipeline.api.docs from local assets (FastAPI's load a CDN)
        redoc_url=None,
    )
    app.state.winnow = state
    errors.install(app)
    openapi.install(app, settings)
    docs.install(app)
    app.add_middleware(RequestLimit, settings=settings)  # innermost: counts authorised requests
    app.add_middleware(GuardMiddleware, settings=settings)  # inner: runs after metrics starts
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.include_router(router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
