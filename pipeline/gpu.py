"""GPU visibility for /metrics and /ready: memory in use and utilisation per CUDA device (NVML).

``nvidia-ml-py`` (``pynvml``, in the ``gpu`` extra) is imported lazily; without it, without a driver or
without a GPU every function returns an empty result instead of raising, so callers need no checks.
torch's own counters (memory allocated/reserved by this process) are added when CUDA is initialised.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)
_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised; False when unavailable


def _init() -> Any:
    """pynvml after ``nvmlInit`` (once per process), or None when NVML is unavailable."""
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as exc:  # ImportError, NVMLError (no driver / no GPU)
                log.debug("NVML unavailable: %s", exc)
                _nvml = False
        return _nvml or None


def gpu_stats() -> dict[str, float]:
    """Flat gauges per device ``i``: ``gpu{i}_memory_used_bytes``, ``_memory_total_bytes``,
    ``_utilization_percent`` (NVML); plus this process's ``torch_cuda{i}_allocated_bytes`` and
    ``_reserved_bytes`` when torch has CUDA initialised. Empty on machines without a GPU."""
    out: dict[str, float] = {}
    nvml = _init()
    if nvml is not None:
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                out[f"gpu{i}_memory_used_bytes"] = float(mem.used)
                out[f"gpu{i}_memory_total_bytes"] = float(mem.total)
                out[f"gpu{i}_utilization_percent"] = float(util.gpu)
        except Exception as exc:  # a device can vanish or deny queries; never break /metrics
            log.debug("NVML query failed: %s", exc)
    out.update(_torch_stats())
    return out


def _torch_stats() -> dict[str, float]:
    import sys

    torch = sys.modules.get("torch")  # never import torch just for metrics
    if torch is None or not torch.cuda.is_initialized():
        return {}
    out: dict[str, float] = {}
    for i in range(torch.cuda.device_count()):
        out[f"torch_cuda{i}_allocated_bytes"] = float(torch.cuda.memory_allocated(i))
        out[f"torch_cuda{i}_reserved_bytes"] = float(torch.cuda.memory_reserved(i))
    return out


def gpu_summary() -> dict[str, Any]:
    """For /ready: device count and per-device memory/utilisation, or ``{"gpus": 0}``."""
    stats = gpu_stats()
    n = len({k.split("_", 1)[0] for k in stats if k.startswith("gpu")})
    return {"gpus": n, **stats}
