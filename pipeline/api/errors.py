"""The one place that maps exceptions to HTTP status codes and client-safe messages."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.models import ModelUnavailable
from pipeline.rerank.batcher import Overloaded
from pipeline.search import RerankUnavailable
from pipeline.store import InvalidFilter, SchemaMismatch, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error whose message is written for the client."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


class NotReady(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "not_ready", message, {"Retry-After": "5"})


def _json(status: int, type_: str, message: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
    )


def to_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return _json(exc.status, exc.type, exc.message, exc.headers)
    if isinstance(exc, Overloaded):
        retry = str(max(1, round(exc.retry_after)))
        return _json(
            429, "overloaded", "the reranker queue is full; retry later", {"Retry-After": retry}
        )
    if isinstance(exc, InvalidFilter):
        return _json(422, "invalid_filter", str(exc))
    if isinstance(exc, StoreUnavailable):
        return _json(
            503,
            "milvus_unavailable",
            "the vector store (Milvus) is not reachable; retry shortly",
            {"Retry-After": "5"},
        )
    if isinstance(exc, SchemaMismatch):
        return _json(503, "collection_mismatch", str(exc))
    if isinstance(exc, RerankUnavailable):
        return _json(400, "rerank_unavailable", str(exc))
    if isinstance(exc, StoreError):
        return _json(502, "milvus_error", "the vector store rejected the operation; see the log")
    if isinstance(exc, ModelUnavailable):
        return _json(503, "model_unavailable", "a model could not be loaded; see the server log")
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return _json(500, "internal_error", f"internal server error (ref {ref}); see the server log")


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(422, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    # specific classes are handled inside the app (no re-raise); Exception is the last resort
    for cls in (ApiError, Overloaded, StoreError, RerankUnavailable, ModelUnavailable, Exception):
        app.add_exception_handler(cls, _mapped)
