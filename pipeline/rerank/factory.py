"""``build_reranker(settings.reranker)``: the configured backend, not yet loaded (imported by runtime only).

Backends are imported inside the branches, so building one never imports another (nor vllm on a
machine without it).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from pipeline.devices import cuda_available

if TYPE_CHECKING:
    from pipeline.config import RerankSettings
    from pipeline.rerank.base import RerankEngine, Reranker


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_backend(settings: RerankSettings) -> str:
    """``auto`` = vLLM on CUDA when installed (and no int8 asked), else transformers."""
    if settings.rerank_backend != "auto":
        return settings.rerank_backend
    on_cuda = settings.rerank_device.startswith("cuda") or (
        settings.rerank_device == "auto" and cuda_available()
    )
    int8 = settings.rerank_quant != "none"  # a CPU mode of the hf engine
    return "vllm" if on_cuda and vllm_installed() and not int8 else "hf"


def build_engine(settings: RerankSettings, model: str) -> RerankEngine:
    """The local engine (``hf`` or ``vllm``) the settings pick."""
    if pick_backend(settings) == "vllm":
        from pipeline.rerank.backends.vllm import VLLMEngine

        return VLLMEngine(
            model,
            max_model_len=settings.rerank_max_length,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            dtype=settings.rerank_dtype,
        )
    from pipeline.rerank.backends.hf.engine import HFEngine

    return HFEngine(
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


def build_reranker(settings: RerankSettings, model_path: str | None = None) -> Reranker:
    """The configured backend, not yet loaded (call ``load()`` off the event loop); it takes the
    reranker's settings group (``settings.reranker``) and nothing else."""
    model = model_path if model_path is not None else settings.rerank_model
    if settings.rerank_backend == "remote":
        from pipeline.rerank.backends.remote.reranker import RemoteReranker

        return with_cache(RemoteReranker.from_settings(settings), settings)
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher

    engine = build_engine(settings, model)
    batcher = MicroBatcher.from_settings(engine, settings)
    return with_cache(BatchedReranker(engine, settings.rerank_model, batcher), settings)


def with_cache(reranker: Reranker, settings: RerankSettings) -> Reranker:
    """The score cache in front of ``reranker`` when ``WINNOW_RERANK_CACHE_MB`` > 0."""
    if settings.rerank_cache_mb <= 0:
        return reranker
    from pipeline.rerank.cache import CachedReranker, ScoreCache, identity

    return CachedReranker(reranker, ScoreCache(settings.rerank_cache_mb << 20), identity(settings))
