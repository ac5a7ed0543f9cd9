"""pipeline.gpu: empty (never an error) without a GPU; real gauges on CUDA machines."""

from __future__ import annotations

import pytest

from pipeline.gpu import gpu_stats, gpu_summary


def test_no_gpu_gives_empty_or_valid_gauges() -> None:
    stats = gpu_stats()
    assert all(isinstance(v, float) and v >= 0 for v in stats.values())
    assert gpu_summary()["gpus"] == len({k.split("_")[0] for k in stats if k.startswith("gpu")})


@pytest.mark.gpu
def test_gpu_gauges_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.zeros(1, device="cuda")
    stats = gpu_stats()
    assert stats["gpu0_memory_total_bytes"] > 0
    assert 0 <= stats["gpu0_utilization_percent"] <= 100
    assert stats["torch_cuda0_allocated_bytes"] > 0
