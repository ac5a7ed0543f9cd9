"""Request/response models of the HTTP API.

Types are strict (``"top_n": "5"`` or ``"rerank": 0`` are refused, not coerced). Limits that come from
Settings (top_k, lengths, documents) are checked by SearchService and written into the OpenAPI schema by
``pipeline/api/openapi.py``, so the schema tells the truth for the server it describes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from pipeline.domain import invalid_unicode_at
from pipeline.search import RecallMode
from pipeline.writes import DocStatus


def _json_integer(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; strict pydantic would not. Strings stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]
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


class Body(BaseModel):
    """Every request body: its strings must be valid Unicode (one check, before any field)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = invalid_unicode_at(data)
        if where is not None:
            raise ValueError(
                f"{where} is not valid Unicode (a lone UTF-16 surrogate such as \\ud800): "
                "send UTF-8 text"
            )
        return data


class SearchBody(Body):
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
    rerank_budget_ms: PositiveInt | None = Field(
        None,
        description="Most milliseconds the reranking may take, queue included: the best-recalled "
        "candidates the reranker can score within it (by its measured cost) are reranked, the rest "
        "follow in recall order with reranked=false. Default WINNOW_SEARCH_RERANK_BUDGET_MS "
        "(0 = the reranker's deadline, WINNOW_RERANK_DEADLINE_S).",
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
    reranked: bool = Field(
        description="Scored by the reranker. Reranked results come first, by score (P(yes)); "
        "the others follow in recall order, their score the recall score."
    )


class SearchOut(BaseModel):
    results: list[SearchHit]
    timings_ms: dict[str, float]
    candidates: int = Field(description="Passages recalled.")
    reranked: int = Field(
        description="Of those, how many the reranker scored (the best-recalled ones; fewer than "
        "candidates when the rest would not fit rerank_budget_ms; 0 with rerank off)."
    )
    mode: RecallMode
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
    status: DocStatus
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
    """A document object (Jina, Cohere): ``text`` is scored; other fields are for ``rank_fields``."""

    model_config = ConfigDict(strict=True, extra="allow")

    text: str


class RerankedText(BaseModel):
    """A reranked document echoed back (``return_documents``)."""

    text: str


Query = Annotated[
    str, Field(min_length=1, pattern=r"\S", description="What the documents are ranked for.")
]


class RerankBody(Body):
    """Cohere v1/v2, Jina, vLLM and Infinity rerank request; documents are strings or objects."""

    model_config = ConfigDict(extra="ignore", strict=True)  # clients send extra Cohere fields

    model: str | None = Field(None, max_length=256, description="Ignored: this server's model.")
    query: Query
    documents: list[str | RerankDocument] = Field(min_length=1)
    top_n: NonNegativeInt | None = Field(None, description="Results returned; 0 or absent: all.")
    return_documents: bool = False
    rank_fields: list[str] | None = Field(
        None,
        description="Cohere v1: with object documents, the fields whose values (in this order, "
        "one per line) make the text that is scored.",
    )
    raw_scores: bool = Field(
        False, description="Infinity: relevance_score is the yes-no logit instead of P(yes)."
    )
    instruction: str | None = None
    max_tokens_per_doc: PositiveInt | None = None
    truncate: bool = Field(True, description="Cut over-long documents (false: answer 422).")
    max_chunks_per_doc: ChunksPerDoc | None = None
    min_score: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Drop results whose relevance_score (P(yes)) is below this; "
        "below_min_score says how many.",
    )

    @model_validator(mode="before")
    @classmethod
    def _rank_fields(cls, data: Any) -> Any:
        """Cohere v1: an object document's text is the values of its ``rank_fields`` (those it has,
        in that order, one per line; a value that is not a string as JSON), else its ``text``."""
        if not isinstance(data, dict) or not data.get("rank_fields"):
            return data
        fields, docs = data["rank_fields"], data.get("documents")
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            return data  # the field's own validation says what is wrong
        if not isinstance(docs, list):
            return data
        out = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict):
                out.append(doc)
                continue
            parts = [
                v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                for v in (doc[f] for f in fields if f in doc)
            ]
            if parts:
                out.append("\n".join(parts))
            elif "text" in doc:
                out.append(doc)
            else:
                raise ValueError(
                    f"documents[{i}] has none of the rank_fields and no text: name fields the "
                    "documents have"
                )
        return {**data, "documents": out}

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class TeiRerankBody(Body):
    """Hugging Face TEI's /rerank request (told apart by ``texts``); answered as TEI's list."""

    model_config = ConfigDict(extra="ignore", strict=True)

    query: Query
    texts: list[str] = Field(min_length=1, description="The documents.")
    raw_scores: bool = Field(False, description="The yes-no logit instead of P(yes).")
    return_text: bool = False
    truncate: bool | None = Field(
        None,
        description="false: a document over WINNOW_MAX_DOCUMENT_CHARS is refused (422); "
        "true or absent: documents are cut as the model card cuts (keeping their start).",
    )
    truncation_direction: Literal["right", "Right"] = Field(
        "right",
        description="Only right (keep the start): the model card cuts a document's end.",
    )
    instruction: str | None = None
    max_chunks_per_doc: ChunksPerDoc | None = None


def _rerank_dialect(value: Any) -> str:
    if isinstance(value, dict):
        return "tei" if "texts" in value and "documents" not in value else "cohere"
    return "tei" if isinstance(value, TeiRerankBody) else "cohere"


DIALECT_TAGS = frozenset({"cohere", "tei", "text", "queries_documents", "queries_items", "data"})

AnyRerankBody = Annotated[
    Annotated[RerankBody, Tag("cohere")] | Annotated[TeiRerankBody, Tag("tei")],
    Discriminator(_rerank_dialect),
]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankedText | None = None
    best_window: int | None = Field(
        None, description="With max_chunks_per_doc > 1: the document's window that scored."
    )


class Usage(BaseModel):
    documents: int = Field(description="Documents scored.")
    prompt_tokens: int = Field(
        description="Tokens of the prompts the reranker reads (template, instruction, query and "
        "the document after the card's cut, per pair and window); a pair answered from the score "
        "cache counts as if scored. Estimated (characters / 4) where the server has no tokenizer."
    )
    total_tokens: int = Field(description="Equal to prompt_tokens (a reranker generates none).")


class RerankOut(BaseModel):
    id: str
    object: Literal["rerank"] = "rerank"
    created: int
    model: str
    results: list[RerankResult]
    meta: dict[str, Any]
    usage: Usage
    below_min_score: int | None = Field(
        None, description="Results dropped by min_score (absent when none was sent)."
    )


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


ScoreText = str | Annotated[list[str], Field(min_length=1)]
ScoreQuery = Query | Annotated[list[Query], Field(min_length=1)]


class _ScoreCommon(Body):
    model_config = ConfigDict(extra="ignore", strict=True)  # vLLM's other fields (user, priority …)

    model: str | None = Field(None, max_length=256, description="Ignored: this server's model.")
    instruction: str | None = None
    max_tokens_per_doc: NonNegativeInt | None = Field(
        None, description="Cut each document to about this many tokens; 0: no cut of its own."
    )
    use_activation: bool | None = Field(
        None, description="false: the yes-no logit instead of P(yes)."
    )
    truncate_prompt_tokens: Literal[-1] | None = Field(
        None, description="Only -1 (the model's limit): pairs are cut as the model card cuts."
    )
    truncation_side: Literal["right"] | None = Field(
        None, description="Only right: the model card cuts a document's end."
    )
    max_chunks_per_doc: ChunksPerDoc | None = None


class ScoreTextBody(_ScoreCommon):
    text_1: ScoreQuery = Field(description="The query (or N queries, scored pairwise).")
    text_2: ScoreText = Field(description="The documents.")


class ScoreQueriesBody(_ScoreCommon):
    queries: ScoreQuery
    documents: ScoreText


class ScoreItemsBody(_ScoreCommon):
    queries: ScoreQuery
    items: ScoreText


class ScoreDataBody(_ScoreCommon):
    data_1: ScoreQuery
    data_2: ScoreText


def _score_shape(value: Any) -> str:
    if isinstance(value, dict):
        for key, tag in (("text_1", "text"), ("data_1", "data"), ("items", "queries_items")):
            if key in value:
                return tag
        return "queries_documents"
    return {
        ScoreTextBody: "text",
        ScoreDataBody: "data",
        ScoreItemsBody: "queries_items",
    }.get(type(value), "queries_documents")


AnyScoreBody = Annotated[
    Annotated[ScoreTextBody, Tag("text")]
    | Annotated[ScoreQueriesBody, Tag("queries_documents")]
    | Annotated[ScoreItemsBody, Tag("queries_items")]
    | Annotated[ScoreDataBody, Tag("data")],
    Discriminator(_score_shape),
]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreOut(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ClassifierLabels(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class InfoOut(BaseModel):
    """Hugging Face TEI's GET /info, for the clients that check it (Dify's TEI plugin, tei-client)."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[Literal["reranker"], ClassifierLabels]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail
    detail: str = Field(description="The message again, for clients that read a top-level detail.")


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
