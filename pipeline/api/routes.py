"""Route handlers: HTTP in, one service call, HTTP out. Limits, defaults and status codes live elsewhere.

Auth and the body-size limit run before any of these (``pipeline/api/guard.py``); exceptions become
responses in ``pipeline/api/errors.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.api.errors import ApiError
from pipeline.api.guard import caller_of
from pipeline.api.schemas import (
    ERROR_RESPONSES,
    ReadyOut,
    RerankBody,
    RerankDocument,
    RerankOut,
    RerankResult,
    SearchBody,
    SearchOut,
)
from pipeline.api.state import AppState

STATIC = Path(__file__).parent / "static"
T = TypeVar("T")

router = APIRouter()


async def app_state(request: Request) -> AppState:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop on every request
    return request.app.state.winnow


State = Annotated[AppState, Depends(app_state)]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it when the client goes away so its queued rerank work is dropped."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "client_closed", "client closed the request")
    finally:
        if not task.done():
            task.cancel()


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def ready(request: Request, st: State) -> JSONResponse:
    # file paths only for a caller with a key (the guard says who authenticated)
    ok, body = await st.readiness(detail=caller_of(request.scope) is not None)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(st: State) -> PlainTextResponse:
    body = generate_latest(st.metrics.registry)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.post("/v1/search", response_model=SearchOut, responses=ERROR_RESPONSES, tags=["search"])
async def search(body: SearchBody, request: Request, st: State) -> dict[str, Any]:
    service = await st.checked_service()
    res = await until_disconnect(request, service.search(**body.model_dump()))
    for stage in ("embed", "recall", "rerank"):
        st.metrics.stage.labels(stage).observe(res.timings_ms[stage] / 1000)
    return res.as_dict()


async def rerank(body: RerankBody, request: Request, st: State) -> RerankOut:
    texts = body.texts()
    st.metrics.batch_pairs.observe(len(texts))
    res = await until_disconnect(
        request,
        st.service.rerank(
            body.query,
            texts,
            top_n=body.top_n,
            instruction=body.instruction,
            truncate=body.truncate,
            max_tokens_per_doc=body.max_tokens_per_doc,
            max_chunks_per_doc=body.max_chunks_per_doc,
            min_score=body.min_score,
        ),
    )
    st.metrics.stage.labels("rerank").observe(res.rerank_ms / 1000)
    return RerankOut(
        id=str(uuid.uuid4()),
        model=res.model,
        results=[
            RerankResult(
                index=r.index,
                relevance_score=r.score,
                document=RerankDocument(text=texts[r.index]) if body.return_documents else None,
                best_window=r.best_window,
            )
            for r in res.results
        ],
        meta={"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        usage={"documents": res.documents},
        below_min_score=res.below_min_score,
    )


for _path in ("/v1/rerank", "/v2/rerank"):  # /v2/rerank: what the Cohere SDK calls
    router.add_api_route(
        _path,
        rerank,
        methods=["POST"],
        response_model=RerankOut,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
        include_in_schema=_path == "/v1/rerank",
    )
