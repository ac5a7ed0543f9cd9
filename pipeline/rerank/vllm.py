"""Qwen3-Reranker on vLLM (GPU): the original checkpoint loaded as a yes/no sequence classifier.

vLLM batches and prefix-caches by itself, so there is no micro-batcher in front of it; calls run in one
worker thread so the event loop never blocks. Prompt text comes from :mod:`pipeline.rerank.prompt`.
When ``LLM.score`` accepts a ``chat_template`` (newer vLLM), a template that just concatenates the two
pre-formatted sides is passed, so the whole prompt is tokenized as one string exactly like the card;
otherwise the card's vLLM example form is used (query side + document side).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.rerank.prompt import format_document, format_query

log = logging.getLogger(__name__)

INSTALL_HINT = "the vllm backend needs vLLM: pip install 'winnow[gpu]' (CUDA GPU required)"
HF_OVERRIDES: dict[str, Any] = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
# Renders to format_query(q) + format_document(d), i.e. format_pair(q, d), byte for byte.
CONCAT_TEMPLATE = (
    '{{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}'
    '{{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}'
)


def build_score_inputs(
    query: str, docs: Sequence[str], instruction: str | None = None
) -> tuple[str, list[str]]:
    """(query side, document sides) for ``LLM.score(query, docs)``: one query against N documents."""
    return format_query(query, instruction), [format_document(d) for d in docs]


def extract_scores(outputs: Sequence[Any], n_docs: int) -> list[float]:
    """Scores from vLLM ``ScoringRequestOutput``s, in input order (outputs come back in prompt order)."""
    if len(outputs) != n_docs:
        raise RuntimeError(f"vLLM returned {len(outputs)} scores for {n_docs} documents")
    scores = []
    for out in outputs:
        inner = getattr(out, "outputs", out)
        score = getattr(inner, "score", inner)
        scores.append(float(score))
    return scores


def llm_kwargs(
    model: str, *, gpu_memory_utilization: float, max_model_len: int, dtype: str = "auto"
) -> dict[str, Any]:
    """Arguments for ``vllm.LLM`` (pooling runner, yes/no classifier from the LM head, prefix caching)."""
    return {
        "model": model,
        "runner": "pooling",
        "hf_overrides": dict(HF_OVERRIDES),
        "enable_prefix_caching": True,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "dtype": dtype,
    }


class VLLMReranker:
    """Reranker protocol on vLLM; ``load()`` imports vllm lazily and builds the engine."""

    backend = "vllm"

    def __init__(
        self,
        model: str,
        *,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int = 8192,
        dtype: str = "auto",
    ) -> None:
        self.model = str(model)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.pairs_scored = 0
        self.requests_scored = 0
        self._llm: Any = None
        self._use_template = False
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-rerank")

    def load(self) -> None:
        with self._lock:
            if self._llm is not None:
                return
            try:
                import vllm
            except ImportError as e:
                raise ImportError(INSTALL_HINT) from e
            kwargs = llm_kwargs(
                self.model,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                dtype=self.dtype,
            )
            try:
                llm = vllm.LLM(**kwargs)
            except TypeError:  # older vLLM spells the pooling runner task="score"
                kwargs.pop("runner")
                llm = vllm.LLM(task="score", **kwargs)
            try:
                self._use_template = "chat_template" in inspect.signature(llm.score).parameters
            except (TypeError, ValueError):
                self._use_template = False
            self._llm = llm
            log.info("vLLM reranker %s loaded (template=%s)", self.model, self._use_template)

    def score_sync(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        """Blocking score (runs in the worker thread)."""
        if not docs:
            return []
        if self._llm is None:
            self.load()
        q, ds = build_score_inputs(query, docs, instruction)
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self._use_template:
            kwargs["chat_template"] = CONCAT_TEMPLATE
        outputs = self._llm.score(q, ds, **kwargs)
        self.requests_scored += 1
        self.pairs_scored += len(docs)
        return extract_scores(outputs, len(docs))

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.score_sync, query, list(docs), instruction
        )

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._llm = None
