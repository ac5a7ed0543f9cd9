"""Qwen3-Reranker on transformers: the model card's function, computed faster (DESIGN.md §4).

The score of a pair is ``softmax([logit_no, logit_yes])[1]`` at the last token of
``PREFIX + body + SUFFIX`` (body tokenized with truncation exactly as the card does). This engine returns
the same numbers (fp32 |Δ| ≤ 1e-4, checked in tests/test_rerank_hf.py against the card code) while:

- running the shared head of a request (system prompt + instruction + query) once and reusing its KV
  cache for every document; heads of several requests are left-padded to a common length so pairs of
  different requests share one forward pass (explicit position ids keep RoPE positions exact);
- running only the decoder (``model.model``) and dotting the last hidden state with the two LM-head rows
  (no, yes) instead of projecting every position onto the 151,669-token vocabulary;
- sorting pairs by length and cutting batches by a token budget that counts padding, closing a batch
  early when padding would exceed ``max_padding`` of its real tokens (padding is pure waste once a
  forward holds enough tokens to keep the matrix units busy);
- attending in query chunks (``_chunked_sdpa``): chunk ``[a, b)`` of a tail only looks at keys
  ``< head + b``, so the masked upper triangle of the tail-to-tail scores is mostly never computed
  (SDPA with an explicit mask computes every block).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.rerank import RerankRequest
from pipeline.rerank.prompt import (
    body_budget,
    encode_fixed,
    format_body,
    format_head,
    yes_no_token_ids,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Padded tokens (head KV + tail) per forward pass. CPU: bigger batches stop paying off once the GEMMs
# are large (measured with bench/rerank.py); GPU: limited by activation memory, not by efficiency.
DEFAULT_BATCH_TOKENS_CPU = 8192
DEFAULT_BATCH_TOKENS_GPU = 65536
# Padded tail tokens a forward may hold before the padding limit applies: below this, a bigger batch
# buys more GEMM efficiency than its padding costs (CPU fp32 GEMMs reach ~90% of peak at 256-512 rows).
MIN_FILL_CPU = 512
MIN_FILL_GPU = 8192
DEFAULT_MAX_PADDING = 0.1  # padded tail tokens ≤ (1 + this) × real tail tokens, once past the fill
# Queries per attention call in the tail forwards (keys are cut at the chunk's causal horizon).
ATTENTION_CHUNK_CPU = 128
ATTENTION_CHUNK_GPU = 1024
ATTENTION_NAME = "winnow_chunked_sdpa"


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


@dataclass(slots=True)
class _Pair:
    """One (request, document) pair after tokenization: shared head key + its own tail tokens."""

    req: int
    doc: int
    head: int  # index into the batch's unique heads
    tail: list[int]


@dataclass(slots=True)
class _Head:
    ids: list[int]
    kv: list[tuple[Any, Any]] = field(default_factory=list)  # per layer: (keys, values) [kvh, L, d]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer from a transformers cache object, across 4.x and 5.x layouts."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _chunked_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA over query chunks, each against the keys up to its causal horizon (same numbers).

    Only installed on HFEngine's own model, whose masks are always ``[rows, 1, q, head + q]`` with the
    last ``q`` keys causal (head KV, then this forward's tokens), so chunk ``[a, b)`` never sees a key
    at or beyond ``head + b``. Anything else goes to transformers' SDPA unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    chunk = ATTENTION_CHUNK_CPU if query.device.type == "cpu" else ATTENTION_CHUNK_GPU
    if attention_mask is None or attention_mask.dim() != 4 or q_len <= chunk or kv_len < q_len:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    gqa_kw: dict[str, Any] = {}
    if groups > 1:
        if query.device.type == "cpu":
            gqa_kw["enable_gqa"] = True  # CPU flash kernel: GQA with a mask, no K/V copies
        else:  # CUDA kernels fall back to math for masked GQA: expand K/V instead
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    offset = kv_len - q_len
    outs = []
    for a in range(0, q_len, chunk):
        b = min(a + chunk, q_len)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:b],
                key[:, :, : offset + b],
                value[:, :, : offset + b],
                attn_mask=attention_mask[:, :, a:b, : offset + b],
                scale=scaling,
                **gqa_kw,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _install_chunked_attention(lm: Any) -> bool:
    """Switch ``lm`` to :func:`_chunked_sdpa`; False (plain SDPA kept) on transformers without the API."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, _chunked_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        lm.set_attn_implementation(ATTENTION_NAME)
    except (ImportError, AttributeError, ValueError, KeyError) as exc:
        log.info("chunked attention unavailable (%s); using plain SDPA", exc)
        return False
    return True


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
    ) -> None:
        """Cheap: nothing is imported or loaded until :meth:`load`.

        ``max_padding=None`` turns the padding limit off (batches cut by the token budget only);
        ``chunked_attention=False`` keeps transformers' plain SDPA (for comparisons).
        """
        self.model = str(model)
        self.device = device
        self.dtype = dtype  # replaced by the resolved torch dtype name after load()
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.min_fill = MIN_FILL_CPU
        self.chunked_attention = False  # True once installed by load()
        self._want_chunked_attention = chunked_attention
        self._requested_device = device
        self._requested_dtype = dtype
        self._lock = threading.Lock()
        self._loaded = False
        self._tokenizer: Any = None
        self._decoder: Any = None
        self._head_weight: Any = None  # [2, hidden]: LM-head rows (no, yes)
        self._cache_kw = "cache"
        self.prefix_ids: list[int] = []
        self.suffix_ids: list[int] = []
        self.yes_id = -1
        self.no_id = -1
        # Counters for Prometheus (monotonic ints) and gauges of the last call.
        self.requests_scored = 0
        self.pairs_scored = 0
        self.tokens_scored = (
            0  # tokens the model actually ran (heads once + tails), padding excluded
        )
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

    def load(self) -> None:
        """Load tokenizer + causal LM (SDPA, eval); idempotent and thread-safe."""
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
            if self._want_chunked_attention:
                self.chunked_attention = _install_chunked_attention(lm)
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
            body_budget(self.max_length, self.prefix_ids, self.suffix_ids)  # validates max_length
            self.yes_id, self.no_id = yes, no
            self.device = device
            self.dtype = str(dtype).removeprefix("torch.")
            on_cpu = device == "cpu"
            if self.max_batch_tokens is None:
                self.max_batch_tokens = (
                    DEFAULT_BATCH_TOKENS_CPU if on_cpu else DEFAULT_BATCH_TOKENS_GPU
                )
            self.min_fill = MIN_FILL_CPU if on_cpu else MIN_FILL_GPU
            self._loaded = True
            log.info(
                "reranker %s loaded on %s (%s), max_length=%d, max_batch_tokens=%d",
                self.model,
                device,
                self.dtype,
                self.max_length,
                self.max_batch_tokens,
            )

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
        pairs, heads, ref_tokens = self._tokenize(requests)
        out: list[list[float]] = [[0.0] * len(r.docs) for r in requests]
        forwards = 0
        if pairs:
            with torch.inference_mode():
                forwards += self._run_heads(heads)
                for batch in self._cut_batches(pairs, heads):
                    scores = self._run_tails(batch, heads)
                    forwards += 1
                    for p, s in zip(batch, scores, strict=True):
                        out[p.req][p.doc] = s
        self.requests_scored += len(requests)
        self.pairs_scored += len(pairs)
        self.reference_tokens += ref_tokens
        self.forward_passes += forwards
        self.batches += 1
        self.last_batch_requests = len(requests)
        self.last_batch_pairs = len(pairs)
        self.last_batch_forwards = forwards
        self.last_batch_seconds = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------------------------------
    def _tokenize(self, requests: Sequence[RerankRequest]) -> tuple[list[_Pair], list[_Head], int]:
        """Tokenize like the card, then split each pair at its request's shared head.

        The head length is the longest token prefix common to every pair of the request and to the
        document-free head, so splitting never changes a token, whatever the text or truncation.
        """
        tok = self._tokenizer
        limit = body_budget(self.max_length, self.prefix_ids, self.suffix_ids)
        enc_kw: dict[str, Any] = {
            "padding": False,
            "truncation": "longest_first",
            "max_length": limit,
            "return_attention_mask": False,
        }
        pairs: list[_Pair] = []
        heads: list[_Head] = []
        head_index: dict[tuple[int, ...], int] = {}
        ref_tokens = 0
        for ri, req in enumerate(requests):
            if not req.docs:
                continue
            texts = [format_head(req.query, req.instruction)]
            texts += [format_body(req.query, d, req.instruction) for d in req.docs]
            bodies = tok(texts, **enc_kw)["input_ids"]
            head_body, doc_bodies = bodies[0], bodies[1:]
            shared = min(_common_prefix_len(head_body, b) for b in doc_bodies)
            key = tuple(self.prefix_ids + head_body[:shared])
            hi = head_index.get(key)
            if hi is None:
                hi = head_index[key] = len(heads)
                heads.append(_Head(list(key)))
            for di, body in enumerate(doc_bodies):
                tail = body[shared:] + self.suffix_ids
                pairs.append(_Pair(ri, di, hi, tail))
                ref_tokens += len(self.prefix_ids) + len(body) + len(self.suffix_ids)
        return pairs, heads, ref_tokens

    def _cut_batches(self, pairs: list[_Pair], heads: list[_Head]) -> list[list[_Pair]]:
        """Sort by length, then cut so rows × (longest head + longest tail) stays within budget.

        Past ``min_fill`` padded tail tokens, a batch also closes when the next pair would push its
        padding beyond ``max_padding`` × its real tail tokens: sorted neighbours batch together, and a
        long document no longer pads a batch of short ones to its length.
        """
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        fill = min(self.min_fill, budget)
        slack = None if self.max_padding is None else 1.0 + self.max_padding
        order = sorted(pairs, key=lambda p: (len(heads[p.head].ids) + len(p.tail), p.head))
        batches: list[list[_Pair]] = []
        cur: list[_Pair] = []
        max_head = max_tail = real = 0
        for p in order:
            h, t = max(max_head, len(heads[p.head].ids)), max(max_tail, len(p.tail))
            rows, tail_real = len(cur) + 1, real + len(p.tail)
            over_budget = rows * (h + t) > budget
            too_padded = slack is not None and rows * t > max(fill, slack * tail_real)
            if cur and (over_budget or too_padded):
                batches.append(cur)
                cur, h, t, tail_real = [], len(heads[p.head].ids), len(p.tail), len(p.tail)
            cur.append(p)
            max_head, max_tail, real = h, t, tail_real
        if cur:
            batches.append(cur)
        return batches

    def _forward(self, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        kwargs = {self._cache_kw: cache}
        return self._decoder(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs
        )

    def _run_heads(self, heads: list[_Head]) -> int:
        """Run each unique head once (right-padded, budget-cut) and keep its per-layer KV."""
        import torch

        dev = self.device
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        order = sorted(range(len(heads)), key=lambda i: len(heads[i].ids))
        groups: list[list[int]] = []
        for i in order:
            n = len(heads[i].ids)
            if groups and (len(groups[-1]) + 1) * n <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            lens = [len(heads[i].ids) for i in group]
            width = max(lens)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lens[row]] = torch.tensor(heads[i].ids)
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
                heads[i].kv = [(k[row, :, :n], v[row, :, :n]) for k, v in layers]
            self._count(len(group), len(group) * width, sum(lens))
        return len(groups)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _run_tails(self, batch: list[_Pair], heads: list[_Head]) -> list[float]:
        """One forward over the tails of ``batch`` on top of their heads' cached KV."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        rows = len(batch)
        uniq = sorted({p.head for p in batch})
        slot = {h: i for i, h in enumerate(uniq)}
        head_lens = torch.tensor([len(heads[h].ids) for h in uniq])
        width_h = int(head_lens.max())
        tail_lens = torch.tensor([len(p.tail) for p in batch])
        width_t = int(tail_lens.max())
        row_slot = torch.tensor([slot[p.head] for p in batch], device=dev)

        # Left-pad every head's KV to width_h (zeros: finite, masked out), then gather one per row.
        layers = []
        for layer in range(len(heads[uniq[0]].kv)):
            ks, vs = [], []
            for h in uniq:
                k, v = heads[h].kv[layer]
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
