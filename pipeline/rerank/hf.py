"""Qwen3-Reranker on transformers: the model card's function, computed faster (DESIGN.md §4).

The score of a pair is ``softmax([logit_no, logit_yes])[1]`` at the last token of
``PREFIX + body + SUFFIX`` (body tokenized exactly as the card does, :func:`prompt.encode_bodies`).
This engine returns the same numbers (fp32 |Δ| ≤ 1e-4, checked in tests against
testkit/card_reference.py) by one of two plans, chosen at load (``plan="auto"``: packed on CUDA, padded
elsewhere); planning is shared (:mod:`pipeline.rerank.plan`), the kernels are not:

- **padded** (CPU): each request's head (system + instruction + query) runs once and its KV is reused
  by every document; tails are sorted by length and cut by a token budget that counts padding and by a
  padding limit (on a CPU GEMM every pad token costs a full token); attention in query chunks
  (:func:`attention.chunked_sdpa`). Only the decoder runs, and the yes/no rows of the LM head are dotted
  with the last hidden state (never the 151,669-wide vocabulary).
- **packed** (CUDA): one padding-free token stream per forward — each distinct head once, then its
  tails — through :class:`pipeline.rerank.packed.PackedDecoder`: fused GEMMs, one attention call per
  layer restricted so a tail sees only its head and itself causally, the card's RoPE positions, yes/no
  read at each tail's last token; index tensors built on the device, one host sync per call. On a
  GPU the enemy is launches and glue, not FLOPs on padding.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.rerank import RerankRequest
from pipeline.rerank.attention import (
    ATTENTION_CHUNK_CPU,
    ATTENTION_NAME,
    chunked_sdpa,
    install_chunked_attention,
    varlen_available,
)
from pipeline.rerank.cut import DocumentCutter
from pipeline.rerank.plan import Pair, Plan, cut_packed, cut_padded, pack, tokenize
from pipeline.rerank.prompt import body_budget, encode_fixed, yes_no_token_ids

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTENTION_CHUNK_CPU",
    "ATTENTION_NAME",
    "HFEngine",
    "chunked_sdpa",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

# Padded tokens (head KV + tail) per forward pass. CPU: small forwards keep each layer's activations
# (tokens × 3072 fp32 in the MLP) in cache; 2048 ran ~20% faster than 8192 on the Xeon of
# docs/benchmarks.md (budget sweep), and the GEMMs are still at peak. GPU: limited by activation memory.
DEFAULT_BATCH_TOKENS_CPU = 2048
DEFAULT_BATCH_TOKENS_GPU = 65536
# The packed plan runs no padding, so a bigger stream costs nothing extra: one forward per 20-document
# request on a CPU (when forced there) and a merged micro-batch in few forwards on a GPU.
DEFAULT_PACKED_TOKENS_CPU = 32768
# Padded tail tokens a forward may hold before the padding limit applies: below this, a bigger batch
# buys more GEMM efficiency than its padding costs (CPU fp32 GEMMs reach ~90% of peak at 256-512 rows).
MIN_FILL_CPU = 512
MIN_FILL_GPU = 8192
DEFAULT_MAX_PADDING = 0.1  # padded tail tokens ≤ (1 + this) × real tail tokens, once past the fill
PLANS = ("auto", "padded", "packed")
CPU_GEMMS = ("auto", "torch", "onednn")
ONEDNN_WIN = 0.9  # auto: oneDNN only when it takes at most this share of torch's GEMM time
COMPILE_MODES = ("auto", "on", "off")
ATTENTION_KERNELS = ("auto", "gather", "varlen")


def resolve_device(device: str) -> str:
    """``auto`` = first CUDA device, else MPS, else CPU."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 / AMX); on plain AVX2 bf16 is emulated and slow."""
    import torch

    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = ""
            try:
                with open("/proc/cpuinfo", encoding="utf-8") as f:
                    flags = f.read()
            except OSError:
                return True  # not Linux: trust oneDNN
            return "avx512_bf16" in flags or "amx_bf16" in flags
    except (AttributeError, RuntimeError):
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = bf16 on CUDA (fp16 if the GPU lacks bf16) and on CPUs with fast bf16, else fp32."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto":
        if dtype not in named:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return named[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


ONEDNN_ROWS_HINT = 512  # rows a padded CPU forward typically carries (MIN_FILL_CPU)


def onednn_linear(linear: Any) -> Any:
    """``linear`` as a :func:`_onednn_linear_class` module: oneDNN's fp32 GEMM on a weight prepacked
    in its layout.

    The same function (|Δ| ~2e-6 in fp32), dense tensors in and out: inductor's own CPU linear
    (``mkldnn._linear_pointwise`` on ``mkldnn._reorder_linear_weight``). Per GEMM on the reranker's
    shapes it ran 2.1-2.6× torch's MKL on an AVX-512 AMD EPYC; ``torch.utils.mkldnn.MkldnnLinear``,
    which converts every input and output to oneDNN's layout, only 1.6-1.9×.
    """
    return _onednn_linear_class()(linear)


@functools.cache
def _onednn_linear_class() -> Any:
    """The module class, made once (torch is imported lazily in this module)."""
    import torch

    class OneDNNLinear(torch.nn.Module):
        def __init__(self, dense: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = dense.in_features, dense.out_features
            weight = dense.weight.detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_ROWS_HINT)
            self.register_buffer("packed", packed)
            bias = dense.bias.detach() if dense.bias is not None else None
            self.register_buffer("bias", bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    return OneDNNLinear


def onednn_is_faster(hidden: int, intermediate: int, rows: int = 512, reps: int = 3) -> bool:
    """Time one MLP-shaped fp32 GEMM both ways on this CPU (~0.2 s): torch's BLAS vs oneDNN.

    On an AVX-512 AMD EPYC (Zen 5) MKL's fp32 GEMM ran at ~90-110 GFLOPS on 2 cores where oneDNN's
    prepacked one ran at ~220 (docs/benchmarks.md); on the AVX2 machine of earlier benchmarks oneDNN
    and MKL were within ±10%. So it is measured, not assumed; an op this torch lacks means no.
    """
    import time

    import torch

    lin = torch.nn.Linear(hidden, intermediate, bias=False).eval()
    x = torch.randn(rows, hidden)

    def best(fn: Any) -> float:
        fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        try:
            dnn = onednn_linear(lin)
            return best(dnn) <= ONEDNN_WIN * best(lin)
        except (RuntimeError, AttributeError):  # no oneDNN (or no such op) in this torch build
            return False


def use_onednn_linears(module: Any) -> int:
    """Swap every ``nn.Linear`` under ``module`` for :func:`onednn_linear`; returns how many."""
    import torch

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, onednn_linear(child))
                swapped += 1
    return swapped


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer from a transformers cache object, across 4.x and 5.x layouts."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


class HFEngine:
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
    ) -> None:
        """Cheap: nothing is imported or loaded until :meth:`load`.

        ``max_padding=None`` turns the padded plan's padding limit off; ``chunked_attention=False``
        keeps transformers' plain SDPA there (for comparisons). ``plan``: auto (packed on CUDA, padded
        elsewhere), padded or packed (forcing packed on CPU is how CI tests it). ``compile``:
        ``torch.compile`` of the packed forward (auto = off until measured to win; see
        docs/benchmarks.md). ``attention``: the packed kernel, auto (gather), gather or varlen (CUDA).
        """
        for name, value, allowed in (
            ("plan", plan, PLANS),
            ("compile", compile, COMPILE_MODES),
            ("attention", attention, ATTENTION_KERNELS),
            ("cpu_gemm", cpu_gemm, CPU_GEMMS),
            ("quant", quant, ("none", "int8")),
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
        self.attention_path = attention  # resolved by load(): chunked-sdpa / sdpa / gather / varlen
        self.cpu_gemm = cpu_gemm  # resolved by load(): torch / onednn (padded plan, CPU, fp32)
        self._requested_cpu_gemm = cpu_gemm
        self.quant = quant  # int8: the decoder's linears in int8 (CPU, padded plan; pipeline/rerank/quant.py)
        self._want_chunked_attention = chunked_attention
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
        # Counters for Prometheus (monotonic ints) and gauges of the last call.
        self.requests_scored = 0
        self.pairs_scored = 0
        self.tokens_scored = 0  # tokens the model actually ran (heads + tails), padding excluded
        self.padded_tokens = 0  # tokens run including padding
        self.reference_tokens = 0  # tokens the card code would have run (full pairs, no padding)
        self.forward_passes = 0
        self.batches = 0  # score_requests calls
        self.last_batch_requests = 0
        self.last_batch_pairs = 0
        self.last_batch_forwards = 0
        self.last_forward_rows = 0
        self.last_forward_tokens = 0
        self.last_batch_seconds = 0.0

    # ------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def document_cutter(self) -> Any:
        """The card's cut and the windows of long documents with this model's tokenizer (loaded)."""
        self.load()  # builds it: its private tokenizer copy is taken before any call can run
        return self._cutter

    def estimate_tokens(self, request: RerankRequest) -> int:
        """Work of ``request`` in tokens, by this tokenizer's measured characters per token."""
        return self.document_cutter().estimate_tokens(request)

    def stats(self) -> dict[str, int | float]:
        """Counters as a plain dict (for metrics and /status)."""
        names = [
            "requests_scored",
            "pairs_scored",
            "tokens_scored",
            "padded_tokens",
            "reference_tokens",
            "forward_passes",
            "batches",
            "last_batch_requests",
            "last_batch_pairs",
            "last_batch_forwards",
            "last_forward_rows",
            "last_forward_tokens",
            "last_batch_seconds",
        ]
        return {n: getattr(self, n) for n in names}

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
            if self.quant != "none":
                from pipeline.rerank.quant import quantize_decoder

                quantize_decoder(decoder, self.quant, device, self.plan)
            if self.plan == "padded":
                self.compile_mode = "off"
                if self._want_chunked_attention:
                    self.chunked_attention = install_chunked_attention(lm)
                self.attention_path = "chunked-sdpa" if self.chunked_attention else "sdpa"
            self.cpu_gemm = self._resolve_cpu_gemm(decoder, device, dtype)
            if self.max_batch_tokens is None:
                if on_cuda:
                    self.max_batch_tokens = DEFAULT_BATCH_TOKENS_GPU
                elif self.plan == "packed":
                    self.max_batch_tokens = DEFAULT_PACKED_TOKENS_CPU
                else:
                    self.max_batch_tokens = DEFAULT_BATCH_TOKENS_CPU
            self.min_fill = MIN_FILL_GPU if on_cuda else MIN_FILL_CPU
            self._loaded = True
            if self.plan == "packed" and (self.compile_mode == "on" or on_cuda):
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
        """fp32 on a CPU, padded plan: the decoder's linears on oneDNN when asked or measured
        faster (bf16 already runs on oneDNN; the packed plan fuses the weights itself)."""
        import torch

        if device != "cpu" or dtype != torch.float32 or self.plan != "padded":
            return "torch"
        choice = self._requested_cpu_gemm
        if choice == "auto":
            cfg = decoder.config
            choice = (
                "onednn" if onednn_is_faster(cfg.hidden_size, cfg.intermediate_size) else "torch"
            )
        if choice == "onednn":
            use_onednn_linears(decoder)
        return choice

    def _resolve_plan(self, decoder: Any, on_cuda: bool) -> str:
        """padded/packed from the request; packed needs a Qwen3 decoder it can reproduce exactly."""
        from pipeline.rerank.packed import PackedDecoder, UnsupportedModel

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
        """Two small requests of different sizes: compiles (dynamic shapes) and selects kernels."""
        docs = ["warm-up document " * 4, "a longer warm-up document " * 24]
        self.score_requests([RerankRequest("warm-up query", docs)])
        self.score_requests([RerankRequest("another warm-up query", docs[::-1] * 3)])
        for name in self.stats():
            setattr(self, name, 0 if name != "last_batch_seconds" else 0.0)

    # ------------------------------------------------------------------------------------------
    def score(self, query: str, docs: Sequence[str], instruction: str | None = None) -> list[float]:
        """P(yes) for each document, in input order (convenience over :meth:`score_requests`)."""
        return self.score_requests([RerankRequest(query, docs, instruction)])[0]

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
        self.requests_scored += len(requests)
        self.pairs_scored += len(plan.pairs)
        self.reference_tokens += plan.reference_tokens
        self.forward_passes += forwards
        self.batches += 1
        self.last_batch_requests = len(requests)
        self.last_batch_pairs = len(plan.pairs)
        self.last_batch_forwards = forwards
        self.last_batch_seconds = time.perf_counter() - t0
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

    # --- padded plan ----------------------------------------------------------------------------
    def _score_padded(self, plan: Plan, out: list[list[float]]) -> int:
        kv: list[list[tuple[Any, Any]]] = [[] for _ in plan.heads]
        forwards = self._run_heads(plan.heads, kv)
        for batch in self.cut_batches(plan):
            scores = self._run_tails(batch, plan.heads, kv)
            forwards += 1
            for p, s in zip(batch, scores, strict=True):
                out[p.req][p.doc] = s
        return forwards

    def _forward(self, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        kwargs = {self._cache_kw: cache}
        return self._decoder(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs
        )

    def _run_heads(self, heads: list[list[int]], kv: list[list[tuple[Any, Any]]]) -> int:
        """Run each unique head once (right-padded, budget-cut) and keep its per-layer KV."""
        import torch

        dev = self.device
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        order = sorted(range(len(heads)), key=lambda i: len(heads[i]))
        groups: list[list[int]] = []
        for i in order:
            n = len(heads[i])
            if groups and (len(groups[-1]) + 1) * n <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            lens = [len(heads[i]) for i in group]
            width = max(lens)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lens[row]] = torch.tensor(heads[i])
            lens_t = torch.tensor(lens)
            valid = torch.arange(width)[None, :] < lens_t[:, None]  # [B, W]
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            # Right padding: real queries never see pads; pad queries see real keys (no empty rows).
            mask = (causal[None] & valid[:, None, :])[:, None]
            positions = torch.arange(width)[None].expand(len(group), -1)
            cache = self._new_cache()
            out = self._forward(ids.to(dev), positions.to(dev), mask.to(dev), cache)
            del out  # the cache object was filled in place
            layers = _cache_layers(cache)
            for row, i in enumerate(group):
                n = lens[row]
                kv[i] = [(k[row, :, :n], v[row, :, :n]) for k, v in layers]
            self._count(len(group), len(group) * width, sum(lens))
        return len(groups)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _run_tails(
        self, batch: list[Pair], heads: list[list[int]], kv: list[list[tuple[Any, Any]]]
    ) -> list[float]:
        """One forward over the tails of ``batch`` on top of their heads' cached KV."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        rows = len(batch)
        uniq = sorted({p.head for p in batch})
        slot = {h: i for i, h in enumerate(uniq)}
        head_lens = torch.tensor([len(heads[h]) for h in uniq])
        width_h = int(head_lens.max())
        tail_lens = torch.tensor([len(p.tail) for p in batch])
        width_t = int(tail_lens.max())
        row_slot = torch.tensor([slot[p.head] for p in batch], device=dev)

        # Left-pad every head's KV to width_h (zeros: finite, masked out), then gather one per row.
        layers = []
        for layer in range(len(kv[uniq[0]])):
            ks, vs = [], []
            for h in uniq:
                k, v = kv[h][layer]
                pad = width_h - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k)
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v)
            if len(uniq) == 1:
                k_all = ks[0].unsqueeze(0).expand(rows, -1, -1, -1)
                v_all = vs[0].unsqueeze(0).expand(rows, -1, -1, -1)
            else:
                k_all = torch.stack(ks).index_select(0, row_slot)
                v_all = torch.stack(vs).index_select(0, row_slot)
            layers.append((k_all, v_all))
        cache = DynamicCache(layers)

        ids = torch.zeros(rows, width_t, dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, : len(p.tail)] = torch.tensor(p.tail)
        row_head_len = head_lens[[slot[p.head] for p in batch]]  # [rows]
        positions = row_head_len[:, None] + torch.arange(width_t)[None, :]
        head_valid = (
            torch.arange(width_h)[None, :] >= (width_h - row_head_len)[:, None]
        )  # [rows, Wh]
        causal = torch.ones(width_t, width_t, dtype=torch.bool).tril()
        mask = torch.cat(
            [
                head_valid[:, None, :].expand(rows, width_t, width_h),
                causal[None].expand(rows, -1, -1),
            ],
            dim=-1,
        )[:, None]  # [rows, 1, Wt, Wh + Wt]
        out = self._forward(ids.to(dev), positions.to(dev), mask.to(dev), cache)
        hidden = out.last_hidden_state
        last = hidden[torch.arange(rows, device=dev), (tail_lens - 1).to(dev)]  # [rows, hidden]
        logits = (last @ self._head_weight.T).float()  # [rows, 2] = (no, yes)
        scores = torch.softmax(logits, dim=-1)[:, 1]
        self._count(rows, rows * (width_h + width_t), int(tail_lens.sum()))
        return scores.cpu().tolist()

    def _count(self, rows: int, padded: int, real: int) -> None:
        self.tokens_scored += real
        self.padded_tokens += padded
        self.last_forward_rows = rows
        self.last_forward_tokens = padded
