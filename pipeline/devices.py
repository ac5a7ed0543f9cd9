"""The one place that picks a device (cpu / cuda / mps) and a dtype for it.

torch is imported inside the functions: importing this module loads nothing.
"""

from __future__ import annotations

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
