"""Errors the services raise about a request, written for the client; no HTTP here.

``pipeline/api/errors.py`` is the one place that turns these (and the store's and reranker's errors) into
status codes, so a condition gets the same status on every route.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self.message = (
            "reranking is off on this server (WINNOW_RERANK=off or no reranker model): "
            "search with rerank=false, or ask the operator to enable it"
        )
        super().__init__(self.message)
