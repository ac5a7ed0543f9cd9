"""The one place that picks a device (cpu / cuda / mps) and a dtype for it, and tunes the process's
allocator for CPU inference (:func:`keep_freed_cpu_memory`).

torch is imported inside the functions: importing this module loads nothing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """``auto`` = first CUDA device, else MPS, else CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = torch.backends.mps
    if mps.is_available():
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


# glibc's malloc hands a freed heap top back to the OS once it exceeds the trim threshold (128 KiB,
# adapting up to 64 MiB) and serves blocks from 128 KiB up (adapting up to 32 MiB) with fresh mmaps,
# so a CPU forward's activations (a 2,048-token fp32 MLP output is 24 MiB; a layer holds several)
# fault in new zeroed pages forward after forward: strace of one 20-document fp32 request showed 84
# brk calls and ~500,000 minor faults, ~1 s of kernel time on 2 cores. vLLM's CPU worker preloads
# tcmalloc for the same reason; mallopt does it without a library.
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and keep what is freed there
    (mallopt), so CPU forwards reuse pages instead of faulting fresh ones in (docs/benchmarks.md:
    faults per request ~500,000 → 0, a request 1-2% faster, peak RSS unchanged). Once per process;
    False where the C library is not glibc (musl, macOS) or refuses a value."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
