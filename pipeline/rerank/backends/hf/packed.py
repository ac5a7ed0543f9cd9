"""The packed plan's forward: Qwen3 decoder over one padding-free stream, yes/no read at tail ends.

Runs the weights of the loaded transformers model (no copy: q/k/v and gate/up are fused into one
matrix each and the original ``nn.Linear`` weights become views of it, so the padded plan still works)
with a minimal op sequence per layer: one GEMM for q/k/v, one RMSNorm for q and k together, one RoPE
for both, one attention call (:mod:`pipeline.rerank.backends.hf.attention`), one GEMM for gate/up. On a GPU the
eager transformers layer spends most of its time launching ~45 kernels of elementwise glue; this one
launches about half as many, and the last layer runs its MLP for the pairs' last tokens only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipeline.rerank.backends.hf.attention import (
    PackedIndex,
    build_index,
    gather_attention,
    varlen_attention,
)

if TYPE_CHECKING:
    import torch

    from pipeline.rerank.backends.hf.plan import PackedLayout

log = logging.getLogger(__name__)


class UnsupportedModel(ValueError):
    """The checkpoint is not a plain Qwen3 decoder this forward reproduces exactly."""


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm as one ``rms_norm`` call (fp32 statistics; a fused kernel on CUDA).

    Qwen3RMSNorm rounds to the model dtype before the weight multiply, the fused op after it: the same
    number in fp32, one bf16 rounding apart in bf16 (well inside the card's own bf16 noise).
    """
    import torch

    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def check_supported(cfg: Any, what: str) -> None:
    """Raise :class:`UnsupportedModel` unless ``cfg`` is a plain full-attention Qwen3 decoder."""
    if getattr(cfg, "model_type", "") != "qwen3":
        raise UnsupportedModel(f"the {what} supports model_type qwen3, not {cfg.model_type!r}")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        raise UnsupportedModel(f"sliding-window layers are not supported by the {what}")


class PackedDecoder:
    """Qwen3 decoder forward over a :class:`PackedLayout`; returns P(yes) per pair (on the device)."""

    def __init__(self, decoder: Any, head_weight: torch.Tensor, kernel: str = "gather") -> None:
        import torch

        cfg = decoder.config
        check_supported(cfg, "packed plan")
        self.kernel = kernel
        self.eps = float(cfg.rms_norm_eps)
        self.n_q = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q)
        self.scale = self.head_dim**-0.5
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.final_w = decoder.norm.weight
        self.head_weight = head_weight  # [2, hidden]: (no, yes)
        self.layers: list[dict[str, Any]] = []
        for layer in decoder.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = _fuse([att.q_proj, att.k_proj, att.v_proj])
            gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
            qk_w = torch.cat(
                [
                    att.q_norm.weight.detach()[None].expand(self.n_q, -1),
                    att.k_norm.weight.detach()[None].expand(self.n_kv, -1),
                ]
            )
            self.layers.append(
                {
                    "in_w": layer.input_layernorm.weight,
                    "qkv_w": qkv[0],
                    "qkv_b": qkv[1],
                    "qk_w": qk_w,
                    "o_w": att.o_proj.weight,
                    "o_b": att.o_proj.bias,
                    "post_w": layer.post_attention_layernorm.weight,
                    "gu_w": gate_up[0],
                    "gu_b": gate_up[1],
                    "down_w": mlp.down_proj.weight,
                    "down_b": mlp.down_proj.bias,
                    "act": mlp.act_fn,
                }
            )
        self.inter = int(decoder.layers[0].mlp.gate_proj.weight.shape[0])

    def index(self, layout: PackedLayout, device: str) -> PackedIndex:
        return build_index(layout, device, self.kernel)

    def __call__(self, index: PackedIndex) -> torch.Tensor:
        """P(yes) per pair, in layout order: a [P] float32 tensor left on the device."""
        import torch

        f = torch.nn.functional
        x = self.embed(index.ids)  # [T, hidden]
        cos, sin = self.rotary(x[None], index.positions[None])
        cos, sin = cos[0][:, None], sin[0][:, None]  # [T, 1, D]
        attend = varlen_attention if index.kernel == "varlen" else gather_attention
        nq, nkv, d, n = self.n_q, self.n_kv, self.head_dim, len(self.layers)
        for li, w in enumerate(self.layers):
            h = _rms(x, w["in_w"], self.eps)
            qkv = f.linear(h, w["qkv_w"], w["qkv_b"])
            qk = qkv[:, : (nq + nkv) * d].view(-1, nq + nkv, d)
            v = qkv[:, (nq + nkv) * d :].view(-1, nkv, d)
            qk = _rotate(w["qk_w"] * _rms(qk, None, self.eps), cos, sin)
            a = attend(qk[:, :nq], qk[:, nq:], v, index, self.scale)
            if li == n - 1:  # only the pairs' last tokens feed the score
                x, a = x.index_select(0, index.last), a.index_select(0, index.last)
            x = x + f.linear(a, w["o_w"], w["o_b"])
            gu = f.linear(_rms(x, w["post_w"], self.eps), w["gu_w"], w["gu_b"])
            x = x + f.linear(
                w["act"](gu[:, : self.inter]) * gu[:, self.inter :], w["down_w"], w["down_b"]
            )
        logits = (_rms(x, self.final_w, self.eps) @ self.head_weight.T).float()  # [P, 2]
        return torch.softmax(logits, dim=-1)[:, 1]


def _fuse(linears: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` and make each original a view of it."""
    import torch

    weights = [lin.weight for lin in linears]
    base = weights[0]
    fused = torch.cat([w.detach() for w in weights])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    del base
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])
    return fused, bias
