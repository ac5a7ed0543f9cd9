"""Opt-in int8 linear layers on CPU (``WINNOW_RERANK_QUANT=int8``; docs/benchmarks.md "int8").

Every ``nn.Linear`` of a model's decoder becomes an :func:`int8_linear`: weights quantized once,
symmetric per output channel; activations quantized on every call, symmetric **per token** (one scale
per row, computed from that row alone), so a pair's score never depends on which other pairs share its
forward, and one outlier token cannot coarsen every other token's grid (as a per-tensor scale does).
The int8 × int8 → int32 product is ``torch._int_mm`` (AVX-512 VNNI on the EPYC of
docs/benchmarks.md: 8 ms for a 512 × 1024 × 3072 product on one core, fp32 43 ms); the dequantization is two multiplies.

What stays in floating point: embeddings, norms, attention (softmax · V), and the reranker's LM head
(its two yes/no rows, taken in fp32 before any layer is swapped): the score ``P(yes)`` is computed
from unquantized logits of quantized hidden states.

Chosen by measurement (bench/quant.py ``--parts linears``, docs/benchmarks.md): on the reranker's
seven linear shapes (512 rows, 2 threads) this module ran 2.35× oneDNN's fp32 GEMM; torchao 0.18's
int8 dynamic mode (the same per-token math) 1.9×; torch's ``quantize_dynamic`` 3.0× (one fused op),
but it quantizes activations per tensor (7-bit on x86/fbgemm: 2.5× this module's error, and a pair's
score would depend on the pairs sharing its forward) and is deprecated. No new dependency.
"""

from __future__ import annotations

import functools
from typing import Any

from pipeline.rerank.backends.hf.fused import kernel

__all__ = [
    "QUANT_MODES",
    "QuantUnsupported",
    "SharedInput",
    "check_quant",
    "int8_linear",
    "quantize_decoder",
    "quantize_linears",
    "quantize_rows",
]

QUANT_MODES = ("none", "int8")
_QMAX = (
    127.0  # symmetric: codes -127..127, zero point 0 (int32 sums cannot overflow below K = 133,000)
)


class QuantUnsupported(ValueError):
    """int8 was asked where it cannot run (a GPU, the packed plan, another backend)."""


def check_quant(quant: str, device: str, plan: str = "padded") -> None:
    """Refuse a quant mode this engine cannot run, saying what to change."""
    if quant not in QUANT_MODES:
        raise QuantUnsupported(f"unknown quant {quant!r}; use one of {', '.join(QUANT_MODES)}")
    if quant == "none":
        return
    if device != "cpu":
        raise QuantUnsupported(
            f"WINNOW_RERANK_QUANT={quant} runs on CPU only, and the reranker is on {device!r}: "
            "set WINNOW_RERANK_DEVICE=cpu, or WINNOW_RERANK_QUANT=none to use the GPU"
        )
    if plan != "padded":
        raise QuantUnsupported(
            f"WINNOW_RERANK_QUANT={quant} runs on the padded plan (the packed plan fuses the "
            "float weights itself): set WINNOW_RERANK_PLAN=auto or padded"
        )


def int8_linear(linear: Any) -> Any:
    """``linear`` (an ``nn.Linear``) as an int8 module computing ``x @ W.T + b`` approximately."""
    return _int8_linear_class()(linear)


class SharedInput:
    """The quantized input of sibling linears fed the same tensor (q/k/v, gate/up): quantized once.

    The first of ``users`` calls quantizes ``x`` and keeps (x, codes, scales); the others, called
    with that very tensor object, take them; after the last the entry is dropped (no activation is
    held past its layer). Any other tensor is quantized afresh: the result never depends on it.
    Not for concurrent forwards: the hf engine runs one at a time (its score lock).
    """

    __slots__ = ("codes", "left", "quantize_rows", "scales", "users", "x")

    def __init__(self, users: int, compile: bool = False) -> None:
        self.users = users
        self.quantize_rows = kernel(quantize_rows, compile)
        self.left = 0
        self.x: Any = None
        self.codes: Any = None
        self.scales: Any = None

    def quantize(self, x: Any, in_features: int) -> tuple[Any, Any]:
        if self.left and x is self.x:
            codes, scales = self.codes, self.scales
            self.left -= 1
            if not self.left:
                self.x = self.codes = self.scales = None
            return codes, scales
        codes, scales = self.quantize_rows(x.reshape(-1, in_features))
        if self.users > 1:
            self.x, self.codes, self.scales, self.left = x, codes, scales, self.users - 1
        return codes, scales


def quantize_rows(x: Any) -> tuple[Any, Any]:
    """Symmetric int8 codes per row of a 2-D tensor and the row scales (fp32, [rows, 1])."""
    import torch

    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    scales = torch.maximum(hi, -lo).float().clamp_(min=1e-12).div_(_QMAX)
    # an all-zero row gets the floor scale and codes 0
    codes = torch.mul(x, scales.reciprocal()).round_().to(torch.int8)
    return codes, scales


def dequantize(acc: Any, scales: Any, weight_scale: Any, bias: Any, dtype: Any) -> Any:
    """int32 accumulators → ``dtype``: row scales × column scales (+ bias), in fp32."""
    out = acc * scales * weight_scale
    if bias is not None:
        out = out + bias
    return out.to(dtype)


@functools.cache
def _int8_linear_class() -> Any:
    """The module class, made once (torch is imported lazily in this module)."""
    import torch

    if not hasattr(torch, "_int_mm"):
        raise QuantUnsupported(
            "this torch has no int8 matmul (torch._int_mm); int8 needs torch ≥ 2.2"
        )

    class Int8Linear(torch.nn.Module):
        """Per-channel int8 weight, per-token dynamic int8 activation, fp32 accumulate and output."""

        def __init__(
            self, dense: torch.nn.Linear, shared: SharedInput | None = None, compile: bool = False
        ) -> None:
            super().__init__()
            self.in_features, self.out_features = dense.in_features, dense.out_features
            w = dense.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / _QMAX  # [out, 1]
            codes = torch.round(w / scale).clamp(-_QMAX, _QMAX).to(torch.int8)
            self.register_buffer("weight_t", codes.t().contiguous())  # [in, out], int8
            self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out], fp32
            bias = dense.bias.detach().float() if dense.bias is not None else None
            self.register_buffer("bias", bias)
            self.shared = shared if shared is not None else SharedInput(1, compile)
            self.dequantize = kernel(dequantize, compile)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            codes, scales = self.shared.quantize(x, self.in_features)
            acc = torch._int_mm(codes, self.weight_t)
            out = self.dequantize(acc, scales, self.weight_scale, self.bias, x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            shared = f", shared by {self.shared.users}" if self.shared.users > 1 else ""
            return f"in_features={self.in_features}, out_features={self.out_features}, int8{shared}"

    return Int8Linear


def quantize_linears(module: Any, compile: bool = False) -> int:
    """Swap every ``nn.Linear`` under ``module`` (exactly that type) for :func:`int8_linear`;
    returns how many. Siblings of one parent with the same input width (q/k/v, gate/up) share one
    :class:`SharedInput`: when the model feeds them the same tensor it is quantized once."""
    import torch

    swapped = 0
    for parent in list(module.modules()):
        linears = [(n, c) for n, c in parent.named_children() if type(c) is torch.nn.Linear]
        widths: dict[int, list[str]] = {}
        for name, child in linears:
            widths.setdefault(child.in_features, []).append(name)
        for names in widths.values():
            shared = SharedInput(len(names), compile)
            for name in names:
                linear = _int8_linear_class()(getattr(parent, name), shared, compile)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def quantize_decoder(
    decoder: Any, quant: str, device: str, plan: str = "padded", compile: bool = False
) -> int:
    """The hf engine's hook: check ``quant`` for this device and plan, then swap the decoder's
    linears (the LM head is not under the decoder; the engine keeps its yes/no rows in fp32).
    ``compile``: the (de)quantization steps as inductor kernels (:mod:`.fused`)."""
    check_quant(quant, device, plan)
    if quant == "none":
        return 0
    swapped = quantize_linears(decoder, compile)
    if swapped == 0:
        raise QuantUnsupported("WINNOW_RERANK_QUANT=int8 found no linear layer to quantize")
    return swapped
