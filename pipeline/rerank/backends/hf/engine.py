"""Qwen3-Reranker on transformers: the model card's function, computed faster (DESIGN.md §4).

The score of a pair is ``softmax([logit_no, logit_yes])[1]`` at the last token of
``PREFIX + body + SUFFIX`` (body tokenized exactly as the card does, :func:`prompt.encode_bodies`).
This engine returns the same numbers (fp32 |Δ| ≤ 1e-4, checked in tests against
testkit/card_reference.py) by one of two plans, chosen at load (``plan="auto"``: packed on CUDA, padded
elsewhere); planning is shared (:mod:`pipeline.rerank.backends.hf.plan`), the kernels are not:

- **padded** (CPU): each request's head (system + instruction + query) runs once and its KV is reused
  by every document; tails are sorted by length and cut by a token budget that counts padding and by a
  padding limit (in transformers' forward every pad token costs a full token; the fused decoder runs
  only its attention padded, its linears on the real tokens); attention in query chunks
  (:func:`attention.chunked_sdpa`). Only the decoder runs, and the yes/no rows of the LM head are dotted
  with the last hidden state (never the 151,669-wide vocabulary).
- **packed** (CUDA): one padding-free token stream per forward — each distinct head once, then its
  tails — through :class:`pipeline.rerank.backends.hf.packed.PackedDecoder`: fused GEMMs, one attention call per
  layer restricted so a tail sees only its head and itself causally, the card's RoPE positions, yes/no
  read at each tail's last token; index tensors built on the device, one host sync per call. On a
  GPU the enemy is launches and glue, not FLOPs on padding.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from pipeline.config import Attention, CpuGemm, Quant, Switch
from pipeline.config import Plan as PlanName
from pipeline.devices import keep_freed_cpu_memory, resolve_device, resolve_dtype
from pipeline.rerank.backends.hf.attention import install_chunked_attention, varlen_available
from pipeline.rerank.backends.hf.linear import onednn_is_faster, use_onednn_linears
from pipeline.rerank.backends.hf.padded import DEFAULT_BATCH_TOKENS_CPU, HeadCache, PaddedPlan
from pipeline.rerank.backends.hf.plan import Pair, Plan, cut_packed, cut_padded, pack, tokenize
from pipeline.rerank.base import EngineStats, RerankEngine, RerankRequest, counter, gauge
from pipeline.rerank.cut import DocumentCutter
from pipeline.rerank.prompt import body_budget, encode_fixed, yes_no_token_ids

log = logging.getLogger(__name__)

# Padded tokens (head KV + tail) per forward pass. CPU (DEFAULT_BATCH_TOKENS_CPU, 2048): small forwards
# keep each layer's activations (tokens × 3072 fp32 in the MLP) in cache; 2048 ran ~20% faster than
# 8192 on the Xeon of docs/benchmarks.md (budget sweep), and the GEMMs are still at peak. GPU: limited
# by activation memory.
DEFAULT_BATCH_TOKENS_GPU = 65536
# The packed plan runs no padding, so a bigger stream costs nothing extra: one forward per 20-document
# request on a CPU (when forced there) and a merged micro-batch in few forwards on a GPU.
DEFAULT_PACKED_TOKENS_CPU = 32768
# Padded tail tokens a forward may hold before the padding limit applies: below this, a bigger batch
# buys more GEMM efficiency than its padding costs (CPU fp32 GEMMs reach ~90% of peak at 256-512 rows).
MIN_FILL_CPU = 512
# The padded plan's fused decoder (padded.PaddedDecoder): its elementwise kernels compiled by inductor
# on a CPU when compile=auto, and bf16 attention upcast to fp32 grouped GEMMs on a CPU
# (docs/benchmarks.md "Fused decoder").
COMPILE_PADDED_CPU = True
UPCAST_ATTENTION_CPU = True
MIN_FILL_GPU = 8192
DEFAULT_MAX_PADDING = 0.1  # padded tail tokens ≤ (1 + this) × real tail tokens, once past the fill
PLANS = get_args(PlanName)  # the settings' Literals: one definition (pipeline/config.py)
CPU_GEMMS = get_args(CpuGemm)
COMPILE_MODES = get_args(Switch)
ATTENTION_KERNELS = get_args(Attention)


@dataclass
class HFStats(EngineStats):
    """The transformers engine's counters (the shared ones in :class:`EngineStats`)."""

    padded_tokens: int = counter(
        "rerank_padded_tokens",
        "token slots of the padded rows run, padding included (the fused decoder runs its linears on the real tokens only)",
    )
    reference_tokens: int = counter(
        "rerank_reference_tokens", "tokens the model card's code would have run for the same pairs"
    )
    head_cache_hits: int = counter(
        "rerank_head_cache_hits",
        "request heads (instruction + query) whose K/V came from the head cache, not a forward",
    )
    last_batch_requests: int = gauge(
        "rerank_engine_last_call_requests", "requests in the last engine call"
    )
    last_batch_pairs: int = gauge("rerank_engine_last_call_pairs", "pairs in the last engine call")
    last_batch_forwards: int = gauge(
        "rerank_engine_last_call_forwards", "forward passes of the last engine call"
    )
    last_forward_rows: int = gauge("rerank_last_forward_rows", "rows in the last forward pass")
    last_forward_tokens: int = gauge(
        "rerank_last_forward_tokens", "tokens in the last forward pass, padding included"
    )
    last_batch_seconds: float = gauge(
        "rerank_engine_last_call_seconds", "seconds of the last engine call", default=0.0
    )


class HFEngine(PaddedPlan, RerankEngine):
    """Synchronous Qwen3-Reranker scorer (RerankEngine); merges pairs of several requests per forward."""

    backend = "hf"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 8192,
        max_batch_tokens: int | None = None,
        max_padding: float | None = DEFAULT_MAX_PADDING,
        chunked_attention: bool = True,
        plan: str = "auto",
        compile: str = "auto",
        attention: str = "auto",
        cpu_gemm: str = "auto",
        quant: str = "none",
        fused: bool = True,
    ) -> None:
        """Cheap: nothing is imported or loaded until :meth:`load`.

        ``max_padding=None`` turns the padded plan's padding limit off; ``chunked_attention=False``
        keeps transformers' plain SDPA there and ``fused=False`` its decoder forward (for comparisons). ``plan``: auto (packed on CUDA, padded
        elsewhere), padded or packed (forcing packed on CPU is how CI tests it). ``compile``:
        ``torch.compile`` of the packed forward (auto = off until measured to win; see
        docs/benchmarks.md). ``attention``: the packed kernel, auto (gather), gather or varlen (CUDA).
        """
        for name, value, allowed in (
            ("plan", plan, PLANS),
            ("compile", compile, COMPILE_MODES),
            ("attention", attention, ATTENTION_KERNELS),
            ("cpu_gemm", cpu_gemm, CPU_GEMMS),
            ("quant", quant, get_args(Quant)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        self.model = str(model)
        self.device = device
        self.dtype = dtype  # replaced by the resolved torch dtype name after load()
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.min_fill = MIN_FILL_CPU
        self.chunked_attention = False  # True once installed by load()
        self.plan = plan  # resolved to padded/packed by load()
        self.compile_mode = compile  # resolved to on/off by load()
        self._requested_compile = compile
        self.attention_path = attention  # resolved by load(): chunked-sdpa / sdpa / gather / varlen
        self.cpu_gemm = cpu_gemm  # resolved by load(): torch / onednn (padded plan, CPU, fp32)
        self._requested_cpu_gemm = cpu_gemm
        self.quant = quant  # int8: the decoder's linears in int8 (CPU, padded plan; pipeline/rerank/backends/hf/quant.py)
        self._want_chunked_attention = chunked_attention
        self._want_fused = fused
        self._fused: Any = None
        self._op_build: Any = None  # the native op's background build (load())
        self._requested_device = device
        self._requested_dtype = "float32" if quant != "none" and dtype == "auto" else dtype
        self._lock = threading.Lock()
        self._score_lock = threading.Lock()
        self._loaded = False
        self._tokenizer: Any = None
        self._cutter: Any = None  # DocumentCutter, built by load()
        self._decoder: Any = None
        self._packed: Any = None  # PackedDecoder
        self._packed_fn: Any = None  # the packed forward, compiled or not
        self._head_weight: Any = None  # [2, hidden]: LM-head rows (no, yes)
        self._cache_kw = "cache"
        self.prefix_ids: list[int] = []
        self.suffix_ids: list[int] = []
        self.yes_id = -1
        self.no_id = -1
        self.counters = HFStats()  # read by /metrics at scrape time
        self._heads = HeadCache()  # the padded plan's recent heads' K/V

    # ------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def document_cutter(self) -> DocumentCutter:
        """The card's cut and the windows of long documents with this model's tokenizer (loaded)."""
        self.load()  # builds it: its private tokenizer copy is taken before any call can run
        return self._cutter

    def reset_head_cache(self) -> None:
        """Forget the cached heads, under the score lock (benchmarks start each phase cold, as vLLM's
        ``reset_prefix_cache`` does)."""
        with self._score_lock:
            self._heads = HeadCache(self._heads.max_bytes)

    def estimate_tokens(self, request: RerankRequest) -> int:
        """Work of ``request`` in tokens, by this tokenizer's measured characters per token."""
        return self.document_cutter().estimate_tokens(request)

    def stats(self) -> HFStats:
        """The live counters (read at scrape time; plain ints, no locking on the hot path)."""
        return self.counters

    def describe(self) -> dict[str, str | int]:
        """The chosen execution path (for the startup log and /ready)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "plan": self.plan,
            "attention": self.attention_path,
            "compile": self.compile_mode,
            "cpu_gemm": self.cpu_gemm,
            "quant": self.quant,
            "max_batch_tokens": int(self.max_batch_tokens or 0),
        }

    def load(self) -> None:
        """Load tokenizer + causal LM (SDPA, eval), pick the plan; idempotent and thread-safe."""
        with self._lock:
            if self._loaded:
                return
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = resolve_device(self._requested_device)
            dtype = resolve_dtype(self._requested_dtype, device)
            if device == "cpu" and keep_freed_cpu_memory():
                log.info("glibc malloc: blocks up to 32 MiB served from the heap, freed ones kept")
            self._op_build = self._start_op_build(device)  # while the model loads
            tok = AutoTokenizer.from_pretrained(self.model)
            dtype_kw = (
                "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            )
            lm = AutoModelForCausalLM.from_pretrained(
                self.model, attn_implementation="sdpa", **{dtype_kw: dtype}
            )
            lm.to(device).eval()
            yes, no = yes_no_token_ids(tok)
            out_emb = lm.get_output_embeddings()
            if getattr(out_emb, "bias", None) is not None:
                raise ValueError("LM head with bias is not supported")
            self._head_weight = out_emb.weight.detach()[[no, yes]].clone()
            decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
            tied = out_emb.weight.data_ptr() == decoder.get_input_embeddings().weight.data_ptr()
            if not tied:
                lm.lm_head = torch.nn.Identity()  # free the untied vocab projection; we keep 2 rows
            params = inspect.signature(decoder.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
            self._tokenizer = tok
            self._decoder = decoder
            self.prefix_ids, self.suffix_ids = encode_fixed(tok)
            self._cutter = DocumentCutter(tok, self.max_length)
            body_budget(self.max_length, self.prefix_ids, self.suffix_ids)  # validates max_length
            self.yes_id, self.no_id = yes, no
            self.device = device
            self.dtype = str(dtype).removeprefix("torch.")
            on_cuda = device.startswith("cuda")
            self.plan = self._resolve_plan(decoder, on_cuda)
            kernels = self.plan == "padded" and self._want_fused and self._compile_kernels(device)
            if self.quant != "none":
                from pipeline.rerank.backends.hf.quant import quantize_decoder

                quantize_decoder(decoder, self.quant, device, self.plan, compile=kernels)
            # before the fused decoder: it reads which linears it runs (oneDNN's take epilogues)
            self.cpu_gemm = self._resolve_cpu_gemm(decoder, device, dtype)
            if self.plan == "padded":
                if self._want_chunked_attention:
                    self.chunked_attention = install_chunked_attention(lm)
                self.attention_path = "chunked-sdpa" if self.chunked_attention else "sdpa"
                self._fused = (
                    self._build_fused(decoder, device, kernels) if self._want_fused else None
                )
                if self._fused is None:
                    self.compile_mode = "off"
            if self.max_batch_tokens is None:
                if on_cuda:
                    self.max_batch_tokens = DEFAULT_BATCH_TOKENS_GPU
                elif self.plan == "packed":
                    self.max_batch_tokens = DEFAULT_PACKED_TOKENS_CPU
                else:
                    self.max_batch_tokens = DEFAULT_BATCH_TOKENS_CPU
            self.min_fill = MIN_FILL_GPU if on_cuda else MIN_FILL_CPU
            self._loaded = True
            if self.compile_mode == "on" or (self.plan == "packed" and on_cuda):
                self._warm_up()  # compile / kernel selection now, not on the first user request
            log.info(
                "reranker %s loaded: device=%s dtype=%s plan=%s attention=%s compile=%s "
                "cpu_gemm=%s max_length=%d max_batch_tokens=%d",
                self.model,
                device,
                self.dtype,
                self.plan,
                self.attention_path,
                self.compile_mode,
                self.cpu_gemm,
                self.max_length,
                self.max_batch_tokens,
            )

    def _resolve_cpu_gemm(self, decoder: Any, device: str, dtype: Any) -> str:
        """fp32 or bf16 on a CPU, padded plan: the decoder's linears on oneDNN's prepacked GEMM when
        asked or measured faster (torch's own bf16 GEMM calls oneDNN too, but reorders the weight on
        every call; the packed plan fuses the weights itself)."""
        import torch

        if device != "cpu" or dtype not in (torch.float32, torch.bfloat16) or self.plan != "padded":
            return "torch"
        choice = self._requested_cpu_gemm
        if choice == "auto":
            cfg = decoder.config
            choice = (
                "onednn"
                if onednn_is_faster(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
                else "torch"
            )
        if choice == "onednn":
            use_onednn_linears(decoder)
        return choice

    def _compile_kernels(self, device: str) -> bool:
        """The padded plan's ``compile``: inductor kernels for its elementwise work (auto: on a CPU
        with a C++ compiler; docs/benchmarks.md "Fused decoder")."""
        from pipeline.rerank.backends.hf.fused import compiler_available

        on_cpu = device == "cpu"
        if self.compile_mode == "auto":
            return on_cpu and COMPILE_PADDED_CPU and compiler_available()
        if self.compile_mode == "on" and on_cpu and not compiler_available():
            raise ValueError(
                "WINNOW_RERANK_COMPILE=on needs a C++ compiler on PATH (g++ or clang++) for "
                "inductor's CPU kernels: install one, or set WINNOW_RERANK_COMPILE=auto or off"
            )
        return self.compile_mode == "on"

    def _start_op_build(self, device: str) -> Any:
        """The native attention op's first build (~10 s), started in the background where the fused
        decoder's kernels may be compiled on this CPU; None elsewhere."""
        from pipeline.rerank.backends.hf.fused import compiler_available

        if device != "cpu" or not self._want_fused or self.compile_mode == "off":
            return None
        if self.plan == "packed" or not UPCAST_ATTENTION_CPU or not compiler_available():
            return None
        from pipeline.rerank.backends.hf.native import start_build

        return start_build()

    def _build_fused(self, decoder: Any, device: str, compile: bool) -> Any:
        """The padded plan's own decoder forward (:class:`padded.PaddedDecoder`); None for a model
        it does not reproduce (transformers' forward then runs)."""
        from pipeline.rerank.backends.hf.fused import Kernels
        from pipeline.rerank.backends.hf.packed import UnsupportedModel
        from pipeline.rerank.backends.hf.padded import PaddedDecoder

        native = compile and device == "cpu" and UPCAST_ATTENTION_CPU
        if native:  # the compiled kernels' switch: the C++ compiler builds this op too
            from pipeline.rerank.backends.hf.native import dtypes

            if self._op_build is not None:
                self._op_build.exception()  # built (a failure: dtypes builds again and logs why)
            native = self.dtype in dtypes()
        try:
            fused = PaddedDecoder(
                decoder, self._head_weight, Kernels(compile), UPCAST_ATTENTION_CPU, native
            )
        except UnsupportedModel as exc:
            log.info("fused padded decoder unavailable (%s); transformers' forward", exc)
            return None
        self.compile_mode = "on" if compile else "off"
        self.attention_path = (
            ("grouped-native" if native else "grouped") if device == "cpu" else "chunked-sdpa"
        )
        return fused

    def _resolve_plan(self, decoder: Any, on_cuda: bool) -> str:
        """padded/packed from the request; packed needs a Qwen3 decoder it can reproduce exactly."""
        from pipeline.rerank.backends.hf.packed import PackedDecoder, UnsupportedModel

        want = self.plan if self.plan != "auto" else ("packed" if on_cuda else "padded")
        if want == "padded":
            return "padded"
        kernel = self.attention_path
        if kernel == "auto":
            kernel = (
                "gather"  # verified everywhere; varlen is opt-in until bench/gpu_check.sh says so
            )
        if kernel == "varlen" and not varlen_available(self.device):
            raise ValueError("attention=varlen needs CUDA and torch.nn.attention.varlen")
        try:
            self._packed = PackedDecoder(decoder, self._head_weight, kernel)
        except UnsupportedModel as exc:
            if self.plan == "packed":
                raise
            log.info("packed plan unavailable (%s); using the padded plan", exc)
            return "padded"
        self.attention_path = kernel
        self._packed_fn = self._packed
        if self.compile_mode == "auto":
            self.compile_mode = "off"
        if self.compile_mode == "on":
            import torch

            self._packed_fn = torch.compile(self._packed.__call__, dynamic=True)
        return "packed"

    def _warm_up(self) -> None:
        """Small calls of every shape class: compiles (dynamic shapes; a size of 1 — one row, one
        document, one head — is its own specialisation) and selects kernels, before any user."""
        docs = ["warm-up document " * 4, "a longer warm-up document " * 24]
        self.score_requests([RerankRequest("warm-up query", docs[:1])])
        self.score_requests([RerankRequest("warm-up query", docs)])
        self.score_requests(
            [
                RerankRequest("another warm-up query", docs[::-1] * 3),
                RerankRequest("a third warm-up query", docs),
            ]
        )
        self.counters.reset()

    # ------------------------------------------------------------------------------------------
    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """Score several requests together; pairs of different requests share forward passes."""
        if not self._loaded:
            self.load()
        import torch

        t0 = time.perf_counter()
        # one call at a time: the batcher calls from its one worker thread, but a start-up profile, an
        # evaluation or a second batcher over the same engine may call beside it, and the tokenizer
        # (reconfigured by each truncating call) must never serve two calls at once
        with self._score_lock:
            plan = self.tokenize(requests)
            out: list[list[float]] = [[0.0] * len(r.docs) for r in requests]
            forwards = 0
            if plan.pairs:
                with torch.inference_mode():
                    if self.plan == "packed":
                        forwards = self._score_packed(plan, out)
                    else:
                        forwards = self._score_padded(plan, out)
        self.counters.requests_scored += len(requests)
        self.counters.pairs_scored += len(plan.pairs)
        self.counters.reference_tokens += plan.reference_tokens
        self.counters.forward_passes += forwards
        self.counters.batches += 1
        self.counters.last_batch_requests = len(requests)
        self.counters.last_batch_pairs = len(plan.pairs)
        self.counters.last_batch_forwards = forwards
        self.counters.last_batch_seconds = time.perf_counter() - t0
        return out

    def tokenize(self, requests: Sequence[RerankRequest]) -> Plan:
        """The card's tokenization, split at each request's shared head (see :func:`plan.tokenize`)."""
        if not self._loaded:
            self.load()
        return tokenize(
            self._tokenizer, requests, self.prefix_ids, self.suffix_ids, self.max_length
        )

    def cut_batches(self, plan: Plan) -> list[list[Pair]]:
        """The batches this engine's plan runs ``plan`` in."""
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        if self.plan == "packed":
            return cut_packed(plan.pairs, plan.heads, budget)
        return cut_padded(plan.pairs, plan.heads, budget, self.min_fill, self.max_padding)

    # --- packed plan ----------------------------------------------------------------------------
    def _score_packed(self, plan: Plan, out: list[list[float]]) -> int:
        """One forward per packed batch, all queued before one device→host read (the only sync).

        The host plans and uploads batch n+1 while the device still runs batch n.
        """
        import torch

        batches = self.cut_batches(plan)
        order: list[Pair] = []
        pending = []
        for batch in batches:
            layout = pack(batch, plan.heads)
            pending.append(self._packed_fn(self._packed.index(layout, self.device)))
            order.extend(layout.pairs)
            self._count(len(layout.pairs), layout.tokens, layout.tokens)  # no padding run
        scores = (pending[0] if len(pending) == 1 else torch.cat(pending)).tolist()
        for p, s in zip(order, scores, strict=True):
            out[p.req][p.doc] = s
        return len(batches)

    def _count(self, rows: int, padded: int, real: int) -> None:
        self.counters.tokens_scored += real
        self.counters.padded_tokens += padded
        self.counters.last_forward_rows = rows
        self.counters.last_forward_tokens = padded
