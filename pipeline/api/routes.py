"""Route handlers: HTTP in, one service call, HTTP out. Limits, defaults and status codes live elsewhere.

Auth and the body-size limit run before any of these (``pipeline/api/guard.py``); exceptions become
responses in ``pipeline/api/errors.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import __version__
from pipeline.api import dialects
from pipeline.api.errors import ApiError
from pipeline.api.guard import caller_of
from pipeline.api.schemas import (
    ERROR_RESPONSES,
    AnyRerankBody,
    AnyScoreBody,
    DeleteBody,
    DocumentOut,
    DocumentsBody,
    DocumentsOut,
    InfoOut,
    ModelsOut,
    PassageOut,
    ReadyOut,
    RerankOut,
    ScoreOut,
    SearchBody,
    SearchOut,
    TeiRank,
)
from pipeline.api.state import AppState
from pipeline.domain import Document
from pipeline.errors import RerankDisabled
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


async def rerank(body: AnyRerankBody, request: Request, st: State) -> JSONResponse:
    """Every rerank dialect: the body picks it (``texts``: TEI; ``documents``: the others).

    The answer is written by ``dialects`` (its schema is the union in ``response_model``)."""
    call = dialects.rerank_call(body)
    st.metrics.batch_pairs.observe(len(call.texts))
    res = await until_disconnect(
        request, st.service.rerank(call.query, call.texts, **call.service_args())
    )
    st.metrics.stage.labels("rerank").observe(res.rerank_ms / 1000)
    return JSONResponse(
        dialects.rerank_answer(call, res, id_=str(uuid.uuid4()), created=int(time.time()))
    )


async def score(body: AnyScoreBody, request: Request, st: State) -> JSONResponse:
    """vLLM's /score: 1:N or N:N pairs, scores in input order."""
    call = dialects.score_call(body)
    st.metrics.batch_pairs.observe(len(call.documents))
    res = await until_disconnect(
        request,
        st.service.score_pairs(
            call.queries,
            call.documents,
            instruction=call.instruction,
            max_tokens_per_doc=call.max_tokens_per_doc,
            max_chunks_per_doc=call.max_chunks_per_doc,
        ),
    )
    body_out = dialects.score_answer(
        call, res, id_=f"score-{uuid.uuid4().hex}", created=int(time.time())
    )
    return JSONResponse(body_out)


RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")  # vLLM, TEI, Infinity · Jina · Cohere v2
SCORE_PATHS = ("/score", "/v1/score")  # vLLM

for _path in RERANK_PATHS:
    for _p in (_path, _path + "/"):  # a trailing slash is served, not redirected (httpx: no follow)
        router.add_api_route(
            _p,
            rerank,
            methods=["POST"],
            response_model=RerankOut | list[TeiRank],
            responses=ERROR_RESPONSES,
            tags=["rerank"],
            include_in_schema=_p == _path,
            summary="Rerank documents for a query (Cohere, Jina, vLLM, Infinity or TEI body)",
        )
for _path in SCORE_PATHS:
    for _p in (_path, _path + "/"):
        router.add_api_route(
            _p,
            score,
            methods=["POST"],
            response_model=ScoreOut,
            responses=ERROR_RESPONSES,
            tags=["rerank"],
            include_in_schema=_p == _path,
            summary="Score (query, document) pairs in input order (vLLM)",
        )


@router.get("/info", response_model=InfoOut, responses=ERROR_RESPONSES, tags=["rerank"])
async def info(st: State) -> dict[str, Any]:
    """TEI's model info: what TEI clients check before they rerank."""
    reranker = st.service.reranker
    if reranker is None:
        raise RerankDisabled("rerank")
    return dialects.tei_info(st.settings, reranker.model, __version__)


@router.get("/v1/models", response_model=ModelsOut, responses=ERROR_RESPONSES, tags=["rerank"])
async def models(st: State) -> dict[str, Any]:
    """OpenAI's model list: the served reranker."""
    reranker = st.service.reranker
    return dialects.model_list(
        reranker.model if reranker is not None else None, st.settings, int(st.started)
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
