"""The rerank dialects of other servers, as pure functions: request body → one call, answer → body.

One rerank handler serves them all (``pipeline/api/routes.py``); what differs between the clients of
vLLM, TEI, Infinity, Cohere and Jina is only the shape of the JSON, and that lives here:

- ``documents`` (Cohere v1/v2, Jina, vLLM, Infinity) → ``{id, results: [{index, relevance_score,
  document?}], usage, meta}``; Cohere v1 ``rank_fields`` are resolved in the schema;
- ``texts`` (Hugging Face TEI) → TEI's bare list ``[{index, score, text?}]``, best first;
- vLLM's ``/score`` (``text_1``/``text_2``, ``queries``/``documents`` or ``items``, ``data_1``/``data_2``)
  → ``{id, object: "list", created, model, data: [{index, object: "score", score}], usage}``.

``raw_scores`` (TEI, Infinity) and ``use_activation: false`` (vLLM) ask for the model's raw logit. The
reranker's score is P(yes) = softmax(no, yes)[yes] = sigmoid(yes − no), so the logit difference is
ln p − ln(1 − p), exact up to float precision (a score saturated at 0 or 1 gives ±36.7).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.api.schemas import (
    RerankBody,
    ScoreDataBody,
    ScoreItemsBody,
    ScoreQueriesBody,
    ScoreTextBody,
    TeiRerankBody,
)
from pipeline.config import Settings
from pipeline.ranking import RerankResponse, ScoreResponse

SATURATION = 2.0**-53  # the closest a float64 score gets to 0 or 1 below 1.0


def logit(p: float) -> float:
    """The yes − no logit behind P(yes)."""
    p = min(max(p, SATURATION), 1.0 - SATURATION)
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True, slots=True)
class RerankCall:
    """What every rerank dialect asks of SearchService.rerank, and how the answer is written."""

    dialect: str  # "documents" | "tei"
    query: str
    texts: list[str]
    top_n: int | None
    instruction: str | None
    truncate: bool
    max_tokens_per_doc: int | None
    max_chunks_per_doc: int | None
    min_score: float | None
    raw: bool  # the logit instead of P(yes)
    return_texts: bool

    def service_args(self) -> dict[str, Any]:
        return {
            "top_n": self.top_n,
            "instruction": self.instruction,
            "truncate": self.truncate,
            "max_tokens_per_doc": self.max_tokens_per_doc,
            "max_chunks_per_doc": self.max_chunks_per_doc,
            "min_score": self.min_score,
        }


def rerank_call(body: RerankBody | TeiRerankBody) -> RerankCall:
    if isinstance(body, TeiRerankBody):
        return RerankCall(
            dialect="tei",
            query=body.query,
            texts=list(body.texts),
            top_n=None,
            instruction=body.instruction,
            truncate=body.truncate is not False,  # absent = TEI's --auto-truncate
            max_tokens_per_doc=None,
            max_chunks_per_doc=body.max_chunks_per_doc,
            min_score=None,
            raw=body.raw_scores,
            return_texts=body.return_text,
        )
    return RerankCall(
        dialect="documents",
        query=body.query,
        texts=body.texts(),
        top_n=body.top_n,
        instruction=body.instruction,
        truncate=body.truncate,
        max_tokens_per_doc=body.max_tokens_per_doc,
        max_chunks_per_doc=body.max_chunks_per_doc,
        min_score=body.min_score,
        raw=body.raw_scores,
        return_texts=body.return_documents,
    )


def _score(call_raw: bool, p: float) -> float:
    return logit(p) if call_raw else p


def usage(documents: int, tokens: int) -> dict[str, int]:
    return {"documents": documents, "prompt_tokens": tokens, "total_tokens": tokens}


def rerank_answer(
    call: RerankCall, res: RerankResponse, *, id_: str, created: int
) -> dict[str, Any] | list[dict[str, Any]]:
    """The body of the answer in the request's dialect."""
    if call.dialect == "tei":
        out: list[dict[str, Any]] = []
        for r in res.results:
            rank: dict[str, Any] = {"index": r.index, "score": _score(call.raw, r.score)}
            if call.return_texts:
                rank["text"] = call.texts[r.index]
            out.append(rank)
        return out
    results = []
    for r in res.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": _score(call.raw, r.score)}
        if call.return_texts:
            item["document"] = {"text": call.texts[r.index]}
        if r.best_window is not None:
            item["best_window"] = r.best_window
        results.append(item)
    body: dict[str, Any] = {
        "id": id_,
        "object": "rerank",
        "created": created,
        "model": res.model,
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        "usage": usage(res.documents, res.tokens),
    }
    if res.below_min_score is not None:
        body["below_min_score"] = res.below_min_score
    return body


@dataclass(frozen=True, slots=True)
class ScoreCall:
    queries: list[str]
    documents: list[str]
    instruction: str | None
    max_tokens_per_doc: int | None
    max_chunks_per_doc: int | None
    raw: bool


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def score_call(
    body: ScoreTextBody | ScoreQueriesBody | ScoreItemsBody | ScoreDataBody,
) -> ScoreCall:
    if isinstance(body, ScoreTextBody):
        first, second = body.text_1, body.text_2
    elif isinstance(body, ScoreItemsBody):
        first, second = body.queries, body.items
    elif isinstance(body, ScoreDataBody):
        first, second = body.data_1, body.data_2
    else:
        first, second = body.queries, body.documents
    return ScoreCall(
        queries=_as_list(first),
        documents=_as_list(second),
        instruction=body.instruction,
        max_tokens_per_doc=body.max_tokens_per_doc or None,  # vLLM: 0 = no cut of its own
        max_chunks_per_doc=body.max_chunks_per_doc,
        raw=body.use_activation is False,
    )


def score_answer(call: ScoreCall, res: ScoreResponse, *, id_: str, created: int) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "list",
        "created": created,
        "model": res.model,
        "data": [
            {"index": i, "object": "score", "score": _score(call.raw, s)}
            for i, s in enumerate(res.scores)
        ],
        "usage": {"prompt_tokens": res.tokens, "total_tokens": res.tokens, "completion_tokens": 0},
    }


def public_model_name(model: str) -> str:
    """The served model's name: a local directory is named by its last part, never its path."""
    if os.sep in model and (model.startswith((os.sep, ".", "~")) or os.path.isdir(model)):
        return os.path.basename(model.rstrip(os.sep)) or model
    return model


def tei_info(settings: Settings, model: str, version: str) -> dict[str, Any]:
    """TEI's GET /info for this server's reranker."""
    s = settings
    return {
        "model_id": public_model_name(model),
        "model_sha": None,
        "model_dtype": s.rerank_dtype,
        "model_type": {"reranker": {"id2label": {"0": "yes"}, "label2id": {"yes": 0}}},
        "max_concurrent_requests": s.rerank_queue_size,
        "max_input_length": s.rerank_max_length,
        "max_batch_tokens": (
            s.rerank_max_batch_tokens
            if s.rerank_max_batch_tokens is not None
            else s.rerank_max_length
        ),
        "max_batch_requests": s.rerank_queue_size,
        "max_client_batch_size": s.max_documents,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": version,
        "sha": None,
        "docker_label": None,
    }


def model_list(model: str | None, settings: Settings, created: int) -> dict[str, Any]:
    """OpenAI's GET /v1/models: the served reranker (none when reranking is off)."""
    data = []
    if model is not None:
        data.append(
            {
                "id": public_model_name(model),
                "object": "model",
                "created": created,
                "owned_by": "winnow",
                "max_model_len": settings.rerank_max_length,
            }
        )
    return {"object": "list", "data": data}
