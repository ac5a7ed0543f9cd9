"""The one place that maps exceptions to HTTP status codes and client-safe messages.

Services raise domain exceptions (:mod:`pipeline.errors`, the store's, the reranker's); routes never pick
a status code. Internal errors are logged with a reference id and never echoed to the client.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.api.schemas import DIALECT_TAGS
from pipeline.errors import RequestError, RerankDisabled, TooLarge, excerpt
from pipeline.model_files import ModelUnavailable
from pipeline.rerank.base import InstructionNotSupported, RerankerError, RerankerUnavailable
from pipeline.rerank.batcher import DeadlineExceeded, Overloaded, WorkTooLarge
from pipeline.rerank.prompt import PromptTooLong
from pipeline.runtime import CollectionMissing
from pipeline.store import InvalidFilter, SchemaMismatch, StoreBusy, StoreError, StoreUnavailable
from pipeline.writes import DocumentNotFound, PartialWrite, WriteOverloaded

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP-level condition (auth, readiness, body size) with a message written for the client."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


class NotReady(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "not_ready", message, {"Retry-After": "5"})


def error_body(type_: str, message: str) -> dict[str, Any]:
    """``error`` (Cohere, OpenAI, vLLM) and the same message as a top-level ``detail`` string (what
    the Jina-style clients of LangChain, LlamaIndex and Haystack read)."""
    return {"error": {"type": type_, "message": message}, "detail": message}


def _json(status: int, type_: str, message: str, headers: dict[str, str] | None = None):
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


FILTER_HELP = (
    "filter on doc_id, chunk, title, text or metadata[...], e.g. "
    'doc_id == "a" or metadata["lang"] == "en"'
)


def to_response(exc: BaseException) -> JSONResponse:
    """Status, type and message for every exception a route can see."""
    if isinstance(exc, ApiError):
        return _json(exc.status, exc.type, exc.message, exc.headers)
    if isinstance(exc, TooLarge):
        return _json(413, exc.kind, exc.message)
    if isinstance(exc, RequestError):
        return _json(422, exc.kind, exc.message)
    if isinstance(exc, PromptTooLong):
        return _json(422, "prompt_too_long", str(exc))
    if isinstance(exc, WorkTooLarge):
        return _json(413, "work_too_large", exc.message)
    if isinstance(exc, DeadlineExceeded):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return _json(503, "deadline_exceeded", exc.message, {"Retry-After": retry})
    if isinstance(exc, Overloaded):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return _json(429, "overloaded", f"{exc.message}; retry later", {"Retry-After": retry})
    if isinstance(exc, WriteOverloaded):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return _json(429, "write_overloaded", f"{exc.message}; retry later", {"Retry-After": retry})
    if isinstance(exc, DocumentNotFound):
        return _json(404, "not_found", exc.message)
    if isinstance(exc, PartialWrite):  # exactly what was and was not applied, per document
        log.warning("partial write: %s (%s)", exc.message, exc.__cause__)
        body = error_body("partial_write", exc.message)
        body["results"] = [r.as_dict() for r in exc.applied]
        body["not_applied"] = exc.not_applied
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if isinstance(exc, RerankDisabled):
        return _json(503, exc.kind, exc.message)
    if isinstance(exc, InstructionNotSupported):
        return _json(422, "instruction_not_supported", str(exc))
    if isinstance(exc, RerankerUnavailable):  # the cause (URL, deadline) is for the operator's log
        log.warning("reranker unavailable: %s", exc)
        retry = str(max(1, math.ceil(exc.retry_after)))
        return _json(
            503,
            "reranker_unavailable",
            "the reranker is not reachable; retry shortly",
            {"Retry-After": retry},
        )
    if isinstance(exc, RerankerError):  # names URLs and settings: for the log, not the client
        ref = uuid.uuid4().hex[:12]
        log.error("remote reranker error (ref %s): %s", ref, exc)
        return _json(502, "reranker_error", f"the reranker refused the request (ref {ref})")
    if isinstance(exc, InvalidFilter):
        expr = getattr(exc, "expression", None)  # the client's own text, quoted short
        what = f"the filter {excerpt(expr)!r}" if expr else "the filter"
        return _json(422, "invalid_filter", f"{what} is not a valid expression: {FILTER_HELP}")
    if isinstance(exc, StoreBusy):  # overload: every Milvus call slot is taken
        log.warning("vector store busy: %s", exc)
        return _json(
            429,
            "milvus_busy",
            "too many searches are waiting for the vector store (Milvus); retry later",
            {"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
        )
    if isinstance(exc, StoreUnavailable):
        log.warning("vector store unavailable: %s", exc)
        return _json(
            503,
            "milvus_unavailable",
            "the vector store (Milvus) is not reachable; retry shortly",
            {"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
        )
    if isinstance(exc, CollectionMissing):
        return _json(503, "no_collection", str(exc), {"Retry-After": "30"})
    if isinstance(exc, SchemaMismatch):
        return _json(503, "collection_mismatch", str(exc))
    if isinstance(exc, StoreError):
        return _json(502, "milvus_error", "the vector store rejected the operation; see the log")
    if isinstance(exc, ModelUnavailable):
        return _json(503, "model_unavailable", "a model could not be loaded; see the server log")
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return _json(500, "internal_error", f"internal server error (ref {ref}); see the server log")


def validation_message(exc: RequestValidationError) -> str:
    """Where and what, for at most five problems; the offending input is never echoed."""
    parts = []
    errors = exc.errors()
    for err in errors[:5]:
        where = list(err.get("loc", ()))
        if len(where) > 1 and where[0] == "body" and where[1] in DIALECT_TAGS:
            del where[1]  # the body's dialect (a union's tag), not a field
        loc = ".".join(str(x) for x in where if x != "body")
        parts.append(f"{loc or 'body'}: {excerpt(str(err.get('msg', 'invalid')), 120)}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods of the path template this URL matches first, over all its routes (GET and
    DELETE /v1/documents/{doc_id} are two routes; Starlette's own 405 names the first one's only).
    """
    from starlette.routing import Match

    scope = {**request.scope, "method": ""}
    routes: list[Any] = []
    todo = list(app.router.routes)
    while todo:  # flattened in registration order (the order Starlette matches in)
        route = todo.pop(0)
        inner = getattr(route, "original_router", None)  # an included router (FastAPI ≥ 0.12x)
        if inner is not None:
            todo[:0] = inner.routes
        else:
            routes.append(route)
    matching = [r for r in routes if r.matches(scope)[0] != Match.NONE]
    if not matching:
        return []
    path = getattr(matching[0], "path", None)
    return sorted(
        {
            m
            for r in matching
            if getattr(r, "path", None) == path
            for m in getattr(r, "methods", None) or ()
        }
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(422, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # every route on this path, not only the first one matched
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return _json(exc.status_code, "http_error", excerpt(str(exc.detail), 200), headers)

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    # specific classes are handled inside the app (no re-raise); Exception is the last resort
    for cls in (
        ApiError,
        RequestError,
        PromptTooLong,
        Overloaded,
        DeadlineExceeded,
        WorkTooLarge,
        InstructionNotSupported,
        RerankerUnavailable,
        RerankerError,
        RerankDisabled,
        WriteOverloaded,
        DocumentNotFound,
        StoreError,
        CollectionMissing,
        ModelUnavailable,
        Exception,
    ):
        app.add_exception_handler(cls, _mapped)
