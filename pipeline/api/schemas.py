"""Request/response models of the HTTP API.

Types are strict (``"top_n": "5"`` or ``"rerank": 0`` are refused, not coerced). Limits that come from
Settings (top_k, lengths, documents) are checked by SearchService and written into the OpenAPI schema by
``pipeline/api/openapi.py``, so the schema tells the truth for the server it describes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _json_integer(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; strict pydantic would not. Strings stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
ChunksPerDoc = Annotated[
    PositiveInt,
    Field(
        description="Score a document longer than the reranker's pair limit "
        "(WINNOW_RERANK_MAX_LENGTH tokens) in up to this many overlapping windows, each with the "
        "query and the prompt's suffix; its score is the best window's (best_window says which). "
        "1 = cut it as the model card does. Default WINNOW_RERANK_CHUNKS_PER_DOC; limit "
        "WINNOW_RERANK_MAX_CHUNKS_PER_DOC. Windows count as work (413/429)."
    ),
]

STRICT = ConfigDict(extra="forbid", strict=True)


class SearchBody(BaseModel):
    model_config = STRICT

    query: str = Field(min_length=1, pattern=r"\S", description="What to search for.")
    top_k: PositiveInt | None = Field(None, description="Candidates recalled from Milvus.")
    top_n: PositiveInt | None = Field(None, description="Results returned (documents).")
    instruction: str | None = Field(None, description="Qwen3-Reranker instruction for this query.")
    filter: str = Field("", description='Milvus filter expression, e.g. doc_id like "docs/%".')
    hybrid: bool | None = Field(
        None,
        description="Dense + BM25 fused recall (the server's WINNOW_FUSION); default from server.",
    )
    rerank: bool | None = Field(None, description="Rerank the candidates; default: when available.")
    max_chunks_per_doc: ChunksPerDoc | None = None
    min_score: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Drop documents whose score is below this (the reranker's P(yes) when "
        "reranked, else the recall score); below_min_score says how many.",
    )


class SearchHit(BaseModel):
    id: str
    doc_id: str
    score: float = Field(description="Final score: rerank P(yes) when reranked, else recall score.")
    recall_score: float = Field(
        description="Cosine (dense) or fused (hybrid: RRF, weighted or min-max, per WINNOW_FUSION) score from recall."
    )
    rerank_score: float | None
    text: str
    title: str
    metadata: dict[str, Any]
    chunk: int
    best_window: int | None = Field(
        None, description="With max_chunks_per_doc > 1: the window of the passage that scored."
    )


class SearchOut(BaseModel):
    results: list[SearchHit]
    timings_ms: dict[str, float]
    candidates: int
    reranked: bool
    mode: Literal["dense", "hybrid", "bm25"]
    below_min_score: int | None = Field(
        None, description="Documents dropped by min_score (null when none was sent)."
    )
    message: str | None = Field(
        None, description="Set when the collection is empty: how to add documents."
    )


class DocumentIn(BaseModel):
    model_config = STRICT

    id: str = Field(min_length=1, description="Your id of the document; the same id replaces it.")
    text: str = Field(description="The whole text; it is split into passages as ingest does.")
    title: str = ""
    metadata: dict[str, Any] = Field(
        default_factory=dict, description='Filterable as metadata["key"] in searches.'
    )


class DocumentsBody(BaseModel):
    model_config = STRICT

    documents: list[DocumentIn] = Field(
        min_length=1,
        description="Up to WINNOW_MAX_WRITE_DOCUMENTS documents (413 above). An id sent twice: "
        "the later copies are rejected.",
    )


class DeleteBody(BaseModel):
    model_config = STRICT

    ids: list[str] = Field(
        min_length=1, description="Document ids (up to WINNOW_MAX_WRITE_DOCUMENTS; 413 above)."
    )


class DocResultOut(BaseModel):
    id: str
    status: Literal["created", "updated", "unchanged", "rejected", "deleted", "not_found"]
    passages: int = Field(0, description="Passages the document has now.")
    embedded: int = Field(0, description="Passages embedded and written by this request.")
    deleted: int = Field(0, description="Stored passages deleted (stale, or the whole document).")
    reason: str | None = Field(None, description="Why a document was rejected.")


class DocumentsOut(BaseModel):
    results: list[DocResultOut]
    counts: dict[str, int] = Field(description="Documents per status.")


class PassageOut(BaseModel):
    id: str
    chunk: int
    title: str
    text: str
    metadata: dict[str, Any]


class DocumentOut(BaseModel):
    id: str
    passages: list[PassageOut]


class RerankDocument(BaseModel):
    model_config = ConfigDict(strict=True)

    text: str


class RerankBody(BaseModel):
    """Cohere v2 / Jina rerank request; documents may be strings or {"text": …} objects."""

    model_config = ConfigDict(extra="ignore", strict=True)  # clients send extra Cohere fields

    model: str | None = Field(None, max_length=256, description="Ignored: this server's model.")
    query: str = Field(
        min_length=1, pattern=r"\S", description="What the documents are ranked for."
    )
    documents: list[str | RerankDocument] = Field(min_length=1)
    top_n: PositiveInt | None = None
    return_documents: bool = False
    instruction: str | None = None
    max_tokens_per_doc: PositiveInt | None = None
    truncate: bool = Field(True, description="Cut over-long documents (false: answer 422).")
    max_chunks_per_doc: ChunksPerDoc | None = None
    min_score: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Drop results whose relevance_score is below this; below_min_score says how "
        "many.",
    )

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None
    best_window: int | None = Field(
        None, description="With max_chunks_per_doc > 1: the document's window that scored."
    )


class RerankOut(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    meta: dict[str, Any]
    usage: dict[str, Any]
    below_min_score: int | None = Field(
        None, description="Results dropped by min_score (absent when none was sent)."
    )


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class ReadyOut(BaseModel):
    ready: bool
    models_loaded: bool
    milvus: bool
    collection: str | None
    rerank: bool
    rerank_ready: bool | None = None
    rerank_backend: str | None
    rerank_model: str | None
    embed_model: str
    documents: int | None = Field(None, description="Documents stored (null: unknown now).")
    writes: bool = Field(description="Whether the write routes are on.")
    hint: str | None = Field(None, description="How to add documents, when there are none.")
    gpu: dict[str, Any] = Field(description="CUDA devices: count, memory in use, utilisation.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why}
    for code, why in {
        400: "the body is not valid JSON / UTF-8",
        401: "missing or wrong API key",
        403: "writes are off, or this key may only read",
        404: "no such document",
        408: "the request body stalled",
        413: "body, documents or work over the limit",
        422: "a field is invalid or over its limit; the message says which",
        429: "the reranker or write queue is full (see Retry-After)",
        503: "Milvus, the collection, the models or the reranker are not available",
    }.items()
}
