"""FastAPI app factory: lifespan (load models, open Milvus), routes, auth, limits, metrics."""

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import __version__
from pipeline.api import errors
from pipeline.api.errors import ApiError, NotReady
from pipeline.api.metrics import Metrics
from pipeline.api.schemas import (
    ErrorOut,
    RerankBody,
    RerankDocument,
    RerankOut,
    RerankResult,
    SearchBody,
    SearchOut,
)
from pipeline.config import Settings
from pipeline.embedding import Embedder
from pipeline.models import resolve_model
from pipeline.rerank import Reranker, build_reranker
from pipeline.search import SearchService
from pipeline.store import MilvusStore, SchemaMismatch, StoreUnavailable

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 413, 422, 429, 503)
}


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


@dataclass
class Runtime:
    """Everything the routes need, built in the lifespan."""

    settings: Settings
    embedder: Embedder
    store: MilvusStore
    reranker: Reranker | None
    service: SearchService
    metrics: Metrics
    models_loaded: bool = False
    collection_checked: bool = False
    started: float = field(default_factory=time.time)

    def check_collection(self) -> None:
        """Refuse a collection built by another embedding model; cheap after the first success."""
        if self.collection_checked:
            return
        model, dim = self.store.open()
        if model is None:
            raise ApiError(
                503,
                "no_collection",
                f"collection {self.settings.collection!r} does not exist yet: ingest documents "
                "first (python -m ingest PATH)",
            )
        self.store.check_model(model, dim, self.settings.embed_model, self.embedder.dim)
        self.collection_checked = True

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        batcher = getattr(self.reranker, "batcher", None)
        if batcher is not None:
            st = batcher.stats
            out.update(
                rerank_requests=st.requests,
                rerank_dispatches=st.dispatches,
                rerank_merged_dispatches=st.merged_dispatches,
                rerank_dropped=st.dropped,
                rerank_rejected=st.rejected,
                queue_depth=batcher.depth,
                last_dispatch_pairs=st.dispatch_sizes[-1] if st.dispatch_sizes else 0,
            )
        engine = getattr(self.reranker, "engine", None)
        if engine is not None:
            out.update(
                rerank_pairs=engine.pairs_scored,
                rerank_tokens=engine.tokens_scored,
                rerank_forward_passes=engine.forward_passes,
            )
        return out


def load_reranker(settings: Settings) -> Reranker | None:
    """The reranker or None when WINNOW_RERANK=off; a missing model fails fast (ModelUnavailable)."""
    if not settings.rerank:
        return None
    path = resolve_model(settings.rerank_model, what="reranker", setting="WINNOW_RERANK_MODEL")
    reranker = build_reranker(settings, model_path=path)
    reranker.load()
    return reranker


def build_runtime(
    settings: Settings, *, embedder: Embedder | None = None, reranker: Reranker | None = None
) -> Runtime:
    emb = embedder if embedder is not None else Embedder.from_settings(settings)
    store = MilvusStore.from_settings(settings)
    runtime: Runtime
    metrics = Metrics(lambda: runtime.stats())
    runtime = Runtime(
        settings=settings,
        embedder=emb,
        store=store,
        reranker=reranker,
        service=SearchService(settings, emb, store, reranker),
        metrics=metrics,
    )
    return runtime


def create_app(
    settings: Settings | None = None,
    *,
    embedder: Embedder | None = None,
    reranker: Reranker | None = None,
) -> FastAPI:
    """Models passed in are used as they are (tests share them); others load in the lifespan."""
    settings = settings if settings is not None else Settings()
    rt = build_runtime(settings, embedder=embedder, reranker=reranker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(rt.embedder.load)
        if rt.reranker is None and settings.rerank:
            rt.reranker = await asyncio.to_thread(load_reranker, settings)
            rt.service.reranker = rt.reranker
        rt.models_loaded = True
        try:
            await asyncio.to_thread(rt.check_collection)
        except (StoreUnavailable, ApiError) as exc:
            log.warning("not ready yet: %s", getattr(exc, "message", exc))
        if rt.reranker is not None:
            log.info("reranker: %s backend, model %s", rt.reranker.backend, rt.reranker.model)
        else:
            log.warning("reranking is OFF: results are recall-only")
        yield
        if rt.reranker is not None:
            await rt.reranker.aclose()
        await asyncio.to_thread(rt.store.close)

    app = FastAPI(
        title="Winnow",
        version=__version__,
        description="Two-stage semantic search: Milvus recall + Qwen3-Reranker.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    errors.install(app)
    bearer = HTTPBearer(auto_error=False)

    async def require_key(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if settings.api_key is None:
            return
        want = settings.api_key.get_secret_value()
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), want.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <WINNOW_API_KEY>'",
                {"WWW-Authenticate": "Bearer"},
            )

    app.add_middleware(MetricsMiddleware, metrics=rt.metrics)

    async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; cancel it when the client goes away so queued rerank work is dropped."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "client_closed", "client closed the request")
        finally:
            if not task.done():
                task.cancel()

    def ready_or_503() -> None:
        if not rt.models_loaded:
            raise NotReady("models are still loading")

    # --- routes ------------------------------------------------------------------------------
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready() -> JSONResponse:
        milvus = await asyncio.to_thread(rt.store.ping) if rt.models_loaded else False
        collection = None
        if milvus:
            try:
                await asyncio.to_thread(rt.check_collection)
                collection = "ok"
            except (ApiError, SchemaMismatch, StoreUnavailable) as exc:
                collection = getattr(exc, "message", None) or str(exc)
        ok = rt.models_loaded and milvus
        body = {
            "ready": ok,
            "models_loaded": rt.models_loaded,
            "milvus": milvus,
            "collection": collection,
            "rerank": rt.reranker is not None,
            "rerank_backend": rt.reranker.backend if rt.reranker else None,
            "rerank_model": rt.reranker.model if rt.reranker else None,
            "embed_model": settings.embed_model,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def check_query(query: str) -> None:
        if len(query) > settings.max_query_chars:
            raise ApiError(
                422,
                "query_too_long",
                f"query is {len(query)} characters; the limit is {settings.max_query_chars} "
                "(WINNOW_MAX_QUERY_CHARS)",
            )

    @app.post(
        "/v1/search",
        response_model=SearchOut,
        responses=ERRORS,
        tags=["search"],
        dependencies=[Depends(require_key)],
    )
    async def search(body: SearchBody, request: Request) -> dict[str, Any]:
        ready_or_503()
        check_query(body.query)
        top_k = body.top_k if body.top_k is not None else settings.top_k
        top_n = body.top_n if body.top_n is not None else settings.top_n
        if top_k > settings.max_top_k:
            raise ApiError(422, "invalid_request", f"top_k must be ≤ {settings.max_top_k}")
        if top_n > settings.max_top_n:
            raise ApiError(422, "invalid_request", f"top_n must be ≤ {settings.max_top_n}")
        await asyncio.to_thread(rt.check_collection)
        res = await until_disconnect(
            request,
            rt.service.search(
                body.query,
                top_k=top_k,
                top_n=top_n,
                instruction=body.instruction,
                filter=body.filter,
                hybrid=body.hybrid,
                rerank=body.rerank,
            ),
        )
        for stage in ("embed", "recall", "rerank"):
            rt.metrics.stage.labels(stage).observe(res.timings_ms[stage] / 1000)
        return res.as_dict()

    async def rerank(body: RerankBody, request: Request) -> RerankOut:
        ready_or_503()
        if rt.reranker is None:
            raise ApiError(
                503, "rerank_disabled", "reranking is off on this server (WINNOW_RERANK=off)"
            )
        check_query(body.query)
        if len(body.documents) > settings.max_documents:
            raise ApiError(
                413,
                "too_many_documents",
                f"{len(body.documents)} documents; the limit is {settings.max_documents} per "
                "request (WINNOW_MAX_DOCUMENTS): split the request",
            )
        limit = settings.max_document_chars
        if body.max_tokens_per_doc is not None:
            limit = min(
                limit, body.max_tokens_per_doc * 4
            )  # ~4 chars per token; model cuts exactly
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        if not body.truncate:
            too_long = [i for i, t in enumerate(texts) if len(t) > limit]
            if too_long:
                raise ApiError(
                    422,
                    "document_too_long",
                    f"documents {too_long[:10]} exceed {limit} characters; shorten them or "
                    "send truncate=true",
                )
        cut = [t[:limit] for t in texts]
        rt.metrics.batch_pairs.observe(len(cut))
        t0 = time.perf_counter()
        scores = await until_disconnect(
            request, rt.reranker.score(body.query, cut, body.instruction)
        )
        rt.metrics.stage.labels("rerank").observe(time.perf_counter() - t0)
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if body.top_n is not None:
            order = order[: body.top_n]
        return RerankOut(
            id=str(uuid.uuid4()),
            model=rt.reranker.model,
            results=[
                RerankResult(
                    index=i,
                    relevance_score=scores[i],
                    document=RerankDocument(text=texts[i]) if body.return_documents else None,
                )
                for i in order
            ],
            meta={"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            usage={"documents": len(texts)},
        )

    for path in ("/v1/rerank", "/v2/rerank"):
        app.add_api_route(
            path,
            rerank,
            methods=["POST"],
            response_model=RerankOut,
            response_model_exclude_none=True,
            responses=ERRORS,
            tags=["rerank"],
            dependencies=[Depends(require_key)],
            include_in_schema=path == "/v1/rerank",
        )
    return app
