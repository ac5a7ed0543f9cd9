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
from pipeline.api.schemas import (
    ERROR_RESPONSES,
    DeleteBody,
    DocumentOut,
    DocumentsBody,
    DocumentsOut,
    PassageOut,
    ReadyOut,
    RerankBody,
    RerankDocument,
    RerankOut,
    RerankResult,
    SearchBody,
    SearchOut,
)
from pipeline.api.state import AppState
from pipeline.domain import Document
from pipeline.writes import DocResult, DocumentNotFound

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
async def ready(st: State) -> JSONResponse:
    ok, body = await st.readiness()
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


def _documents_out(results: list[DocResult]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {"results": [r.as_dict() for r in results], "counts": counts}


@router.post(
    "/v1/documents", response_model=DocumentsOut, responses=ERROR_RESPONSES, tags=["documents"]
)
async def put_documents(body: DocumentsBody, st: State) -> dict[str, Any]:
    """Add or replace documents (by id); unchanged ones are skipped without embedding.

    A search that starts after this answers sees the documents. Not cancelled when the client
    goes away: a write that has started finishes (and resending it is safe).
    """
    writes = await st.write_service()
    docs = [Document(d.id, d.text, d.title, d.metadata, source="api") for d in body.documents]
    return _documents_out(await writes.upsert(docs))


@router.post(
    "/v1/documents/delete",
    response_model=DocumentsOut,
    responses=ERROR_RESPONSES,
    tags=["documents"],
)
async def delete_documents(body: DeleteBody, st: State) -> dict[str, Any]:
    """Delete documents (all their passages); per id: deleted or not_found."""
    writes = await st.write_service()
    return _documents_out(await writes.delete(body.ids))


@router.delete(
    "/v1/documents/{doc_id:path}",
    response_model=DocumentsOut,
    responses=ERROR_RESPONSES,
    tags=["documents"],
)
async def delete_document(doc_id: str, st: State) -> dict[str, Any]:
    """Delete one document: 200, or 404 when no such document is stored."""
    writes = await st.write_service()
    results = await writes.delete([doc_id])
    if results[0].status == "not_found":
        raise DocumentNotFound(doc_id)
    return _documents_out(results)


@router.get(
    "/v1/documents/{doc_id:path}",
    response_model=DocumentOut,
    responses=ERROR_RESPONSES,
    tags=["documents"],
)
async def get_document(doc_id: str, st: State) -> DocumentOut:
    """A stored document's passages in order (404 when none is stored)."""
    writes = await st.write_service()
    hits = await writes.get(doc_id)
    return DocumentOut(
        id=doc_id,
        passages=[
            PassageOut(id=h.id, chunk=h.chunk, title=h.title, text=h.text, metadata=h.metadata)
            for h in hits
        ],
    )
