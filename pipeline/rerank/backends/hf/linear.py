"""CPU linear kernels: oneDNN's prepacked fp32 GEMM in place of torch's ``nn.Linear`` where this CPU
runs it faster (measured at load, :func:`onednn_is_faster`). torch is imported lazily."""

from __future__ import annotations

import functools
from typing import Any

ONEDNN_WIN = 0.9  # auto: oneDNN only when it takes at most this share of torch's GEMM time
# bf16: torch's own GEMM calls oneDNN too (reordering the weight every call), so the gap is small but
# steady: prepacked 424 against 394 GFLOPS, a 20-document request 5-7% faster (2-core Zen 5,
# docs/benchmarks.md); prepacked whenever it is not slower.
ONEDNN_WIN_BF16 = 1.0
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

        def silu(self, x: torch.Tensor) -> torch.Tensor:
            """``silu(self(x))``, the SiLU applied to each output tile in the GEMM's epilogue."""
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "swish", [], "")

        def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            """``self(x) * other``, the product taken in the GEMM's epilogue."""
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.packed, self.bias, "mul"
            )

    return OneDNNLinear


def onednn_is_faster(
    hidden: int, intermediate: int, rows: int = 512, reps: int = 3, dtype: Any = None
) -> bool:
    """Time one MLP-shaped fp32 GEMM both ways on this CPU (~0.2 s): torch's BLAS vs oneDNN.

    On an AVX-512 AMD EPYC (Zen 5) MKL's fp32 GEMM ran at ~90-110 GFLOPS on 2 cores where oneDNN's
    prepacked one ran at ~220 (docs/benchmarks.md); on the AVX2 machine of earlier benchmarks oneDNN
    and MKL were within ±10%. So it is measured, not assumed; an op this torch lacks means no.
    """
    import time

    import torch

    dtype = dtype or torch.float32
    lin = torch.nn.Linear(hidden, intermediate, bias=False).to(dtype).eval()
    x = torch.randn(rows, hidden, dtype=dtype)

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
            win = ONEDNN_WIN_BF16 if dtype == torch.bfloat16 else ONEDNN_WIN
            return best(dnn) <= win * best(lin)
        except (RuntimeError, AttributeError):  # no oneDNN (or no such op) in this torch build
            return False


def gate_in_epilogue(gate: Any, up: Any) -> bool:
    """Whether ``silu(gate(h)) * up(h)`` runs in the two GEMMs' epilogues (``up.times(h,
    gate.silu(h))``): both oneDNN linears in fp32. The SiLU and the product are then taken on each
    output tile while it is in cache, not in a pass over the two ``[tokens, intermediate]`` outputs:
    the MLP of a 2,048-token fp32 forward 3.7% faster (200.8 → 193.4 ms per layer, 2-core Zen 5,
    docs/benchmarks.md), the same numbers (|Δ| ~1e-7). In bf16 it was no faster (92.7 → 93.1 ms), so
    bf16 keeps the compiled SiLU·up kernel, which rounds as transformers does."""
    import torch

    onednn = _onednn_linear_class()
    return (
        type(gate) is onednn
        and type(up) is onednn
        and gate.packed.dtype == torch.float32
        and up.packed.dtype == torch.float32
    )


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
