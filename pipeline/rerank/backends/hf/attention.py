"""Attention kernels of the transformers reranker (torch imported lazily by callers' use).

- :func:`chunked_sdpa` — the padded plan's kernel, installed into transformers' attention interface:
  attention over query chunks, each against the keys up to its causal horizon (same numbers, fewer
  FLOPs on the masked upper triangle than one masked call); fp32 on a CPU as batched GEMMs with the
  query heads of a KV head stacked (:func:`grouped_attention`), else SDPA.
- :class:`PackedIndex` + :func:`gather_attention` / :func:`varlen_attention` — the packed plan's kernels
  over one padding-free token stream (see :class:`pipeline.rerank.backends.hf.plan.PackedLayout`). ``gather``
  gathers each attention row (head + own tokens) into a small padded block and runs one masked SDPA
  per layer: it runs on every device and is what CI verifies. ``varlen`` (CUDA only, torch ≥ 2.10)
  hands the stream to flash attention's variable-length kernel with the queries in place and each
  row's keys gathered (head + own), causal aligned bottom-right; verify it with bench/gpu_check.sh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipeline.rerank.backends.hf.plan import PackedLayout

# Queries per attention call in the padded plan's tail forwards (keys cut at the chunk's horizon).
ATTENTION_CHUNK_CPU = 128
# Queries per chunk of grouped_attention when the values are bf16/fp16: each query multiplies and
# masks about half a chunk of keys past the causal diagonal, so a smaller chunk wastes less, while the
# GEMMs are still thick enough. 64 against 128 on a 2-core Zen 5, SciFact 20-document requests, two
# engines in one process alternating: bf16 2-4% faster (32 no faster than 64). fp32 (and int8, whose
# activations are fp32) measured the same ±2% per request and was not measured merged, so it keeps 128.
GROUPED_CHUNK_CPU = 64
ATTENTION_CHUNK_GPU = 1024
ATTENTION_NAME = "winnow_chunked_sdpa"
PACKED_KERNELS = ("gather", "varlen")


def chunked_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over query chunks, each against the keys up to its causal horizon (same numbers).

    Only installed on HFEngine's own model, whose masks are always ``[rows, 1, q, head + q]`` with the
    last ``q`` keys causal (head KV, then this forward's tokens), so chunk ``[a, b)`` never sees a key
    at or beyond ``head + b``. fp32 on a CPU: :func:`grouped_attention`; otherwise SDPA per chunk.
    Anything else goes to transformers' SDPA unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None or attention_mask.dim() != 4 or kv_len < q_len:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.device.type == "cpu" and query.dtype == torch.float32:
        return grouped_attention(query, key, value, attention_mask, scaling), None
    chunk = ATTENTION_CHUNK_CPU if query.device.type == "cpu" else ATTENTION_CHUNK_GPU
    if q_len <= chunk:
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


def additive_mask(mask: Any) -> Any:
    """A boolean mask (True = attend) → fp32 0 / -inf, contiguous; an fp32 contiguous one as it is."""
    import torch

    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))
    return mask.float().contiguous()


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """fp32 CPU attention as two batched GEMMs per query chunk; returns ``[rows, q, heads, dim]``.

    The query heads that share a KV head are stacked into one GEMM operand (``[rows, kv_heads,
    group × chunk, dim]``), so GQA needs no K/V copies and each GEMM has ``group × chunk`` rows; a
    chunk ``[a, b)`` multiplies only keys below ``head + b`` (the causal horizon). ``mask`` is
    ``[rows, 1, q, kv]``, boolean (True = attend) or additive. On a 2-core Xeon (AVX-512) this ran
    the reranker's layer shapes 1.6-1.8× faster than torch's CPU flash-attention kernel in query
    chunks, and 1.2-2.7× faster than one call of it (docs/benchmarks.md).

    ``value`` may be of a lower precision than ``query``/``key`` (bf16 with fp32 scores, as flash
    kernels do): the probabilities are rounded to its dtype for the second GEMM, accumulated in
    fp32 by oneDNN, and the output is in its dtype.
    """
    import torch

    rows, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group, offset = heads // kv_heads, kv_len - q_len
    scale = scaling if scaling is not None else dim**-0.5
    if chunk is None:
        chunk = ATTENTION_CHUNK_CPU if value.dtype == torch.float32 else GROUPED_CHUNK_CPU
    bias = additive_mask(mask).to(query.dtype) if mask.dtype == torch.bool else mask.to(query.dtype)
    out = value.new_empty(rows, q_len, heads, dim)
    for a in range(0, q_len, chunk):
        b = min(a + chunk, q_len)
        n, horizon = b - a, offset + b
        q = query[:, :, a:b].reshape(rows, kv_heads, group * n, dim)
        scores = torch.matmul(q, key[:, :, :horizon].transpose(-1, -2)).mul_(scale)
        scores.view(rows, kv_heads, group, n, horizon).add_(bias[:, :, None, a:b, :horizon])
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        ctx = torch.matmul(probs, value[:, :, :horizon])  # [rows, kv_heads, group * n, dim]
        out[:, a:b] = ctx.view(rows, heads, n, dim).transpose(1, 2)
    return out


def install_chunked_attention(lm: Any) -> bool:
    """Switch ``lm`` to :func:`chunked_sdpa`; False (plain SDPA kept) on transformers without the API."""
    import logging

    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, chunked_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        lm.set_attn_implementation(ATTENTION_NAME)
    except (ImportError, AttributeError, ValueError, KeyError) as exc:
        logging.getLogger(__name__).info("chunked attention unavailable (%s); plain SDPA", exc)
        return False
    return True


def varlen_available(device: str) -> bool:
    """True where ``torch.nn.attention.varlen.varlen_attn`` exists and the device is CUDA."""
    if not device.startswith("cuda"):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(slots=True)
class PackedIndex:
    """Device tensors of one packed forward, built from one host→device copy (no host sync).

    ``ids``/``positions`` [T]; ``last`` [P] (stream index of each pair's last token). ``gather``:
    ``q_idx`` [R, max_q], ``kv_idx`` [R, max_k], ``mask`` [R, 1, max_q, max_k], ``out_idx`` [T]
    (where token t's output sits in the flattened [R·max_q] block). ``varlen``: ``k_idx`` [ΣK],
    ``cu_q``/``cu_k`` [R + 1].
    """

    kernel: str
    ids: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    max_q: int
    max_k: int
    q_idx: torch.Tensor | None = None
    kv_idx: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    out_idx: torch.Tensor | None = None
    k_idx: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None


def build_index(layout: PackedLayout, device: str, kernel: str = "gather") -> PackedIndex:
    """Upload the layout's integers once and derive every index tensor and mask on the device."""
    import torch

    t, r = layout.tokens, layout.rows
    host = torch.tensor(
        layout.ids
        + layout.q_start
        + layout.q_len
        + layout.pre_start
        + layout.pre_len
        + layout.last,
        dtype=torch.long,
    )
    if device.startswith("cuda"):
        host = host.pin_memory()
    m = host.to(device, non_blocking=True)
    ids, qs, ql = m[:t], m[t : t + r], m[t + r : t + 2 * r]
    ps, pl, last = m[t + 2 * r : t + 3 * r], m[t + 3 * r : t + 4 * r], m[t + 4 * r :]
    rows = torch.arange(r, device=device)
    row_of = torch.repeat_interleave(rows, ql, output_size=t)
    offs = torch.arange(t, device=device) - qs[row_of]
    positions = pl[row_of] + offs
    max_q, max_k = layout.max_q, layout.max_k
    idx = PackedIndex(kernel, ids, positions, last, max_q, max_k)
    if kernel == "varlen":
        klen = pl + ql
        total_k = sum(p + q for p, q in zip(layout.pre_len, layout.q_len, strict=True))
        zero = torch.zeros(1, dtype=torch.long, device=device)
        cu_k = torch.cat([zero, klen.cumsum(0)])
        row_k = torch.repeat_interleave(rows, klen, output_size=total_k)
        off_k = torch.arange(total_k, device=device) - cu_k[row_k]
        pre_k = pl[row_k]
        idx.k_idx = torch.where(off_k < pre_k, ps[row_k] + off_k, qs[row_k] + off_k - pre_k)
        idx.cu_q = torch.cat([zero, ql.cumsum(0)]).to(torch.int32)
        idx.cu_k = cu_k.to(torch.int32)
        return idx
    i = torch.arange(max_q, device=device)
    c = torch.arange(max_k, device=device)
    idx.q_idx = qs[:, None] + torch.minimum(i[None, :], ql[:, None] - 1)
    own = torch.minimum((c[None, :] - pl[:, None]).clamp_min(0), ql[:, None] - 1)
    idx.kv_idx = torch.where(c[None, :] < pl[:, None], ps[:, None] + c[None, :], qs[:, None] + own)
    # Bottom-right causal: query i of a row sees its head (pl keys) and own keys ≤ i. Pad queries
    # (i ≥ q_len) see real keys too, so no row is empty (finite softmax); their output is dropped.
    seen = c[None, None, :] <= (pl[:, None, None] + i[None, :, None])
    real = c[None, None, :] < (pl + ql)[:, None, None]
    idx.mask = (seen & real)[:, None]
    idx.out_idx = row_of * max_q + offs
    return idx


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: PackedIndex, scale: float
) -> torch.Tensor:
    """Attention of the packed stream by rows gathered into one masked SDPA call.

    ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D] → [T, Hq·D].
    """
    import torch

    assert index.q_idx is not None and index.kv_idx is not None and index.out_idx is not None
    hq, d = q.shape[1], q.shape[2]
    groups = hq // k.shape[1]
    qr = q[index.q_idx].transpose(1, 2)  # [R, Hq, max_q, D]
    kr = k[index.kv_idx].transpose(1, 2)  # [R, Hkv, max_k, D]
    vr = v[index.kv_idx].transpose(1, 2)
    kw: dict[str, Any] = {}
    if groups > 1:
        if q.device.type == "cpu":
            kw["enable_gqa"] = True
        else:  # masked GQA would fall back to the math kernel on CUDA
            kr = kr.repeat_interleave(groups, dim=1)
            vr = vr.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        qr, kr, vr, attn_mask=index.mask, scale=scale, **kw
    )  # [R, Hq, max_q, D]
    flat = out.transpose(1, 2).reshape(-1, hq * d)
    return flat.index_select(0, index.out_idx)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: PackedIndex, scale: float
) -> torch.Tensor:
    """Flash varlen attention: queries in stream order, each row's keys = its head + its own tokens."""
    from torch.nn.attention.varlen import varlen_attn

    assert index.k_idx is not None and index.cu_q is not None and index.cu_k is not None
    kr, vr = k.index_select(0, index.k_idx), v.index_select(0, index.k_idx)
    out = varlen_attn(
        q,
        kr,
        vr,
        index.cu_q,
        index.cu_k,
        index.max_q,
        index.max_k,
        scale=scale,
        window_size=(-1, 0),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.reshape(q.shape[0], -1)
