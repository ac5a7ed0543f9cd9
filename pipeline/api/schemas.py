"""Request/response models of the HTTP API (static shape; limits from Settings are checked in routes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, description="What to search for.")
    top_k: int | None = Field(None, ge=1, description="Candidates recalled from Milvus.")
    top_n: int | None = Field(None, ge=1, description="Results returned (documents).")
    instruction: str | None = Field(None, description="Qwen3-Reranker instruction for this query.")
    filter: str = Field("", description='Milvus filter expression, e.g. doc_id like "docs/%".')
    hybrid: bool | None = Field(None, description="Dense + BM25 (RRF) recall; default from server.")
    rerank: bool | None = Field(None, description="Rerank the candidates; default: when available.")


class SearchHit(BaseModel):
    id: str
    doc_id: str
    score: float = Field(description="Final score: rerank P(yes) when reranked, else recall score.")
    recall_score: float = Field(description="Cosine (dense) or RRF (hybrid) score from recall.")
    rerank_score: float | None
    text: str
    title: str
    metadata: dict[str, Any]
    chunk: int


class SearchOut(BaseModel):
    results: list[SearchHit]
    timings_ms: dict[str, float]
    candidates: int
    reranked: bool
    mode: Literal["dense", "hybrid", "bm25"]


class RerankDocument(BaseModel):
    text: str


class RerankBody(BaseModel):
    """Cohere v2 / Jina rerank request; documents may be strings or {"text": …} objects."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    instruction: str | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1)
    truncate: bool = Field(True, description="Cut over-long documents (false: answer 422).")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankOut(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    meta: dict[str, Any]
    usage: dict[str, Any]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail
