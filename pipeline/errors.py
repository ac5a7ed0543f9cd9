"""Errors the services raise about a request, written for the client; no HTTP here.

``pipeline/api/errors.py`` is the one place that turns these (and the store's and reranker's errors) into
status codes, so a condition gets the same status on every route.
"""

from __future__ import annotations

from typing import ClassVar

EXCERPT_CHARS = 80


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, single-line quote of client input for an error message (never the whole input)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class RequestError(ValueError):
    """The request cannot be served as sent; ``message`` says what to change (→ 422)."""

    kind = "invalid_request"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class TooLarge(RequestError):
    """The request asks for more work than one request may carry (→ 413)."""

    kind = "too_large"


class RerankDisabled(RuntimeError):
    """Reranking was asked for, but this server runs without a reranker (→ 503 on every route)."""

    kind = "rerank_disabled"

    # what the caller can do instead, by what was asked: advice must fit the route that refused
    ADVICE: ClassVar[dict[str, str]] = {
        "search": "search with rerank=false (recall order), or ask the operator to enable it",
        "rerank": "this route only reranks, so it cannot answer here: use a server with "
        "reranking on, or /v1/search with rerank=false for recall order",
    }

    def __init__(self, asked: str = "search") -> None:
        self.message = (
            "reranking is off on this server (WINNOW_RERANK=off or no reranker model): "
            + self.ADVICE[asked]
        )
        super().__init__(self.message)
