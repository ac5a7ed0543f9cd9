"""Wire formats of the remote /rerank call: the request body per format (how the Qwen3 instruction
travels, see :mod:`pipeline.rerank.backends.remote.reranker`) and the validated answer. Pure: no I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, get_args

import orjson

from pipeline.config import RemoteFormat
from pipeline.rerank.base import InstructionNotSupported, RerankerError
from pipeline.rerank.prompt import (
    DEFAULT_INSTRUCTION,
    format_document,
    format_query,
    resolve_instruction,
)

FORMATS: tuple[str, ...] = get_args(RemoteFormat)


def check_instruction(fmt: str, instruction: str | None) -> None:
    """Raise :class:`InstructionNotSupported` for a custom instruction the format cannot carry."""
    if fmt == "cohere" and resolve_instruction(instruction) != DEFAULT_INSTRUCTION:
        raise InstructionNotSupported(
            "this reranker (WINNOW_RERANK_REMOTE_FORMAT=cohere) takes no instruction: only the "
            "default one can be scored; use the format winnow or qwen3-formatted for custom "
            "instructions"
        )


def build_payload(
    fmt: str,
    query: str,
    docs: Sequence[str],
    instruction: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The request body for one call; the prompt strings come from :mod:`pipeline.rerank.prompt`."""
    body: dict[str, Any]
    if fmt == "winnow":
        body = {
            "query": query,
            "documents": list(docs),
            "instruction": resolve_instruction(instruction),
        }
    elif fmt == "qwen3-formatted":
        body = {
            "query": format_query(query, instruction),
            "documents": [format_document(d) for d in docs],
        }
    elif fmt == "cohere":
        check_instruction(fmt, instruction)
        body = {"query": query, "documents": list(docs)}
    else:
        raise ValueError(f"unknown remote format {fmt!r}; expected one of {FORMATS}")
    body["top_n"] = len(docs)  # every score back (Cohere and vLLM default to all, Jina may not)
    if model is not None:
        body["model"] = model
    return body


def parse_results(payload: Any, n_docs: int) -> list[float]:
    """Scores in input order from ``{results: [{index, relevance_score, …}]}``, in any order.

    Every index must appear exactly once and every score be a finite number; anything else is a
    :class:`RerankerError` (a server answering for other documents must never reorder ours).
    """
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise RerankerError("the rerank server's answer has no `results` list")
    scores: list[float | None] = [None] * n_docs
    for item in results:
        idx = item.get("index") if isinstance(item, dict) else None
        score = item.get("relevance_score") if isinstance(item, dict) else None
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n_docs:
            raise RerankerError(f"the rerank server answered index {idx!r} for {n_docs} documents")
        if scores[idx] is not None:
            raise RerankerError(f"the rerank server answered index {idx} twice")
        if (
            not isinstance(score, (int, float))
            or isinstance(score, bool)
            or not math.isfinite(score)
        ):
            raise RerankerError(f"the rerank server answered score {score!r} for index {idx}")
        scores[idx] = float(score)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RerankerError(
            f"the rerank server left out {len(missing)} of {n_docs} documents (e.g. {missing[:5]})"
        )
    return [s for s in scores if s is not None]


def loads(content: bytes) -> Any:
    """orjson, and the stdlib's lenient parser when it refuses: a server that writes ``NaN`` (Python's
    ``json.dumps`` does) then gets the precise "score nan" error from :func:`parse_results`."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def describe_refusal(status: int, content: bytes, url: str, model: str | None) -> str:
    """An operator-facing message for a 4xx (it names the URL and settings to fix)."""
    detail = ""
    try:
        body = loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        msg = msg if msg is not None else body.get("message", body.get("detail"))
        detail = str(msg)[:300] if msg is not None else ""
    hint = {
        401: "the key was refused (WINNOW_RERANK_API_KEY)",
        403: "the key was refused (WINNOW_RERANK_API_KEY)",
        404: f"no rerank endpoint there, or unknown model {model!r} (WINNOW_RERANK_URL, "
        "WINNOW_RERANK_REMOTE_MODEL)",
        413: "too many documents per call (lower WINNOW_RERANK_REMOTE_MAX_DOCUMENTS)",
    }.get(status, "the request was refused")
    return f"rerank server {url} answered {status}: {hint}" + (f" ({detail})" if detail else "")
