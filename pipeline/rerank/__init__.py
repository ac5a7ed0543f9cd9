"""Reranking: the Reranker protocol and ``build_reranker(settings)``.

Backends: ``hf`` (transformers, CPU or GPU, behind the cross-request micro-batcher) and ``vllm`` (GPU; it
batches itself). Heavy imports (torch, transformers, vllm) happen inside the backends, never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import Settings


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """One query with its documents; the unit the batcher merges across concurrent requests."""

    query: str
    docs: Sequence[str]
    instruction: str | None = None


@runtime_checkable
class Reranker(Protocol):
    """Scores in input order, each P(yes) in [0, 1]; sorting and top_n belong to SearchService."""

    backend: str
    model: str

    def load(self) -> None: ...

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]: ...

    async def aclose(self) -> None: ...


class RerankEngine(Protocol):
    """A synchronous scorer run in one worker thread; it may merge pairs of several requests."""

    def load(self) -> None: ...

    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]: ...
