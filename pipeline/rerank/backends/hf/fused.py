"""The padded plan's elementwise work, one kernel per group of ops (torch imported lazily).

Each function is the Qwen3 decoder's own arithmetic (transformers' ``Qwen3RMSNorm``, ``rotate_half``
RoPE, ``silu(gate) * up``), written once so that ``torch.compile`` (inductor) can turn each into one
loop over the activation instead of one pass per op (the q/k/v ones also gather the packed
tokens into the attention's padded rows as they write them): RMSNorm is six ops in eager (cast, pow, mean,
add, rsqrt, two multiplies), RoPE five, and in bf16 the norms' fp32 statistics live in registers,
not in an fp32 copy of the activation. The same functions run eagerly when compilation is off, so
the two paths compute the same numbers (fp32 |Δ| ~1e-7) and tests can check one against the other.

Compiled with ``dynamic=True``: sizes are symbolic, so requests of any length reuse one kernel; only
a size of 1 (one row, one query) is a separate specialisation. inductor caches what it compiles on
disk (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``), so a restart reloads
kernels instead of compiling them; the engine compiles them at load (:meth:`Kernels.warm_up`),
never on a user's request.
"""

from __future__ import annotations

import functools
import shutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm: fp32 statistics, rounded to the input dtype before the weight multiply."""
    import torch

    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass: (x + delta, rms(x + delta))."""
    total = x + delta
    return total, rms(total, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def norm_rope(
    x: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """A q or k projection of packed tokens ``[tokens, heads · dim]`` → the attention's padded rows
    ``[rows, heads, width, dim]`` (contiguous), per-head RMSNorm and RoPE on the way, in one pass.
    ``slots`` ``[rows, width]``: the token each padded slot reads (a pad reads a token of its row)."""
    rows, width = slots.shape
    dim = cos.shape[-1]
    x = x.index_select(0, slots.flatten()).view(rows, width, -1, dim)
    heads = rms(x, weight, eps).transpose(1, 2)
    return _rotate(heads, cos[:, None], sin[:, None]).contiguous()


def split_heads(x: torch.Tensor, slots: torch.Tensor, dim: int) -> torch.Tensor:
    """The v projection of packed tokens ``[tokens, heads · dim]`` → ``[rows, heads, width, dim]``
    contiguous (``slots`` as in :func:`norm_rope`)."""
    rows, width = slots.shape
    return (
        x.index_select(0, slots.flatten()).view(rows, width, -1, dim).transpose(1, 2).contiguous()
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.silu(gate) * up


def compiler_available() -> bool:
    """inductor's CPU backend writes C++ and needs a compiler on PATH."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@functools.cache
def compiled(fn: Any) -> Any:
    """``fn`` compiled once per process (dynamic shapes, one graph), shared by every engine.

    dynamo keeps up to ``recompile_limit`` (8) variants per function and then runs it eagerly: one
    engine needs a few per function (a size of 1 or more in each of rows, width, tokens), and a
    process with an fp32 and a bf16 engine (tests, benchmarks) twice that, so the limit is raised
    to 32.
    """
    import torch
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(fn, dynamic=True, fullgraph=True)


class Kernels:
    """The elementwise functions a :class:`~pipeline.rerank.backends.hf.padded.PaddedDecoder` calls:
    compiled (one inductor kernel each) or eager (the same functions, op by op)."""

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        self.rms = kernel(rms, compile)
        self.add_rms = kernel(add_rms, compile)
        self.norm_rope = kernel(norm_rope, compile)
        self.split_heads = kernel(split_heads, compile)
        self.silu_mul = kernel(silu_mul, compile)


def kernel(fn: Any, compile: bool) -> Any:
    """``fn`` itself, or compiled (:func:`compiled`)."""
    return compiled(fn) if compile else fn
