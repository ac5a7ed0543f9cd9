"""The store's errors: what every store raises and ``pipeline/api/errors.py`` maps to status codes.

Pure (no pymilvus): the API, the CLI and the test double import them without loading Milvus.
"""

from __future__ import annotations

from pathlib import Path


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """Milvus cannot be reached (or timed out); the service answers 503 and retries later.

    ``retry_after``: seconds after which a retry may succeed (the breaker's cool-down when open).
    """

    retry_after: float = 5.0

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class StoreBusy(StoreUnavailable):
    """Every Milvus call slot is taken (WINNOW_MILVUS_MAX_INFLIGHT): refused at once (429), never
    queued past its deadline behind calls that may be stuck on a hung Milvus."""

    retry_after = 1.0


class SchemaMismatch(StoreError):
    """The collection was built with another embedding model or dimension."""


class InvalidFilter(StoreError, ValueError):
    """The caller's filter expression was rejected by Milvus (``expression``: the client's text)."""

    def __init__(self, message: str, expression: str = "") -> None:
        super().__init__(message)
        self.expression = expression


class StoreInUse(StoreUnavailable):
    """Another process holds this Milvus Lite file (one process per file).

    A StoreUnavailable: a server keeps answering 503 and picks the file up once it is free.
    ``str(exc)`` is a ready one-line message for a CLI.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        super().__init__(
            f"Milvus Lite file {self.path} is in use by another process (a running "
            "`python -m pipeline serve` or ingest?): stop it, send documents through the running "
            "service with `python -m ingest PATH --server http://HOST:PORT`, or point "
            "WINNOW_MILVUS_URI at a Milvus server"
        )
