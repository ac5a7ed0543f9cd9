"""Reranking: the Reranker protocol and ``build_reranker(settings)``.

Backends: ``hf`` (transformers, CPU or GPU) and ``vllm`` (GPU), both engines behind the same
micro-batcher (admission by work, slices, deadline: :mod:`pipeline.rerank.batcher`), and ``remote`` (any
/rerank HTTP server; it batches on its side). Heavy imports (torch, transformers, vllm, aiohttp) happen
inside the backends, never here.
"""

from __future__ import annotations

import math
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


class RerankerUnavailable(RuntimeError):
    """The reranker could not answer within the call's deadline (answered 503, with Retry-After).

    Raised by the remote backend when the server is unreachable or overloaded past its retries;
    the next call tries again, so service recovers by itself once the reranker is back.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RerankerError(RuntimeError):
    """The remote reranker refused a request (4xx other than 429) or sent an invalid answer (502).

    Not retried: the same request would fail the same way. ``status`` is the remote's HTTP status
    (None for an invalid answer).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InstructionNotSupported(ValueError):
    """A custom instruction was asked of a remote that cannot carry one (answered 422)."""


@runtime_checkable
class Reranker(Protocol):
    """Scores in input order, each P(yes) in [0, 1]; sorting and top_n belong to SearchService."""

    backend: str
    model: str

    def load(self) -> None: ...

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]: ...

    async def affordable(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        budget_s: float = math.inf,
        free: Sequence[bool] | None = None,
    ) -> int:
        """How many leading ``docs`` could be scored within ``budget_s`` seconds now, queue included
        (``free[i]``: a cache hit, no work); raises ``Overloaded`` when the queue alone is the reason
        none fit. A backend without a cost model (remote: its own timeout) answers ``len(docs)``."""
        ...

    def stats(self) -> dict[str, int | float]:
        """Counters for /metrics under the same names for every backend (see BatchedReranker)."""
        ...

    # Optional: ``document_cutter() -> DocumentCutter | None`` (the model's tokenizer: windows of
    # long documents, see pipeline/rerank/cut.py); ``health()`` (remote: /ready asks it).

    async def aclose(self) -> None: ...


class RerankEngine(Protocol):
    """A synchronous scorer run in one worker thread; it may merge pairs of several requests.

    Optional: ``estimate_tokens(request) -> int`` (cheap, no tokenizer: the batcher calls it on the
    event loop per document) and ``max_batch_tokens`` (default slice/dispatch budget).
    """

    def load(self) -> None: ...

    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]: ...

    def stats(self) -> dict[str, int | float]: ...


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pick_backend(settings: Settings) -> str:
    """``auto`` = vLLM on CUDA when installed, else transformers."""
    if settings.rerank_backend != "auto":
        return settings.rerank_backend
    on_cuda = settings.rerank_device.startswith("cuda") or (
        settings.rerank_device == "auto" and cuda_available()
    )
    int8 = settings.rerank_quant != "none"  # a CPU mode of the hf engine
    return "vllm" if on_cuda and vllm_installed() and not int8 else "hf"


def build_reranker(settings: Settings, model_path: str | None = None) -> Reranker:
    """The configured backend, not yet loaded (call ``load()`` off the event loop)."""
    model = model_path if model_path is not None else settings.rerank_model
    if settings.rerank_backend == "remote":
        from pipeline.rerank.remote import RemoteReranker

        return with_cache(RemoteReranker.from_settings(settings), settings)
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher

    engine: RerankEngine
    if pick_backend(settings) == "vllm":
        from pipeline.rerank.vllm import VLLMEngine

        engine = VLLMEngine(
            model,
            max_model_len=settings.rerank_max_length,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            dtype=settings.rerank_dtype,
        )
    else:
        from pipeline.rerank.hf import HFEngine

        engine = HFEngine(
            model,
            device=settings.rerank_device,
            dtype=settings.rerank_dtype,
            max_length=settings.rerank_max_length,
            max_batch_tokens=settings.rerank_max_batch_tokens,
            max_padding=settings.rerank_max_padding,
            plan=settings.rerank_plan,
            compile=settings.rerank_compile,
            attention=settings.rerank_attention,
            cpu_gemm=settings.rerank_cpu_gemm,
            quant=settings.rerank_quant,
        )
    batcher = MicroBatcher(
        engine,
        max_wait_ms=settings.rerank_max_wait_ms,
        queue_size=settings.rerank_queue_size,
        queue_tokens=settings.rerank_queue_tokens,
        slice_tokens=settings.rerank_slice_tokens,
        deadline_s=settings.rerank_deadline_s,
        max_length=settings.rerank_max_length,
    )
    return with_cache(BatchedReranker(engine, settings.rerank_model, batcher), settings)


def with_cache(reranker: Reranker, settings: Settings) -> Reranker:
    """The score cache in front of ``reranker`` when ``WINNOW_RERANK_CACHE_MB`` > 0."""
    if settings.rerank_cache_mb <= 0:
        return reranker
    from pipeline.rerank.cache import CachedReranker, ScoreCache, identity

    return CachedReranker(reranker, ScoreCache(settings.rerank_cache_mb << 20), identity(settings))
