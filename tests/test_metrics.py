"""/metrics families built from backend counters: names, types and per-device labels."""

from __future__ import annotations

from prometheus_client import generate_latest

from pipeline.api.metrics import Metrics


def test_counters_gauges_and_device_labels() -> None:
    stats = {
        "rerank_requests": 3,
        "queue_tokens": 1200,
        "queue_seconds": 4.5,
        "remote_calls": 2,
        "gpu0_memory_used_bytes": 5e9,
        "gpu1_utilization_percent": 40.0,
        "torch_cuda0_reserved_bytes": 2e9,
        "not_exported": 1,
    }
    text = generate_latest(Metrics(lambda: stats).registry).decode()
    assert "winnow_rerank_requests_total 3.0" in text
    assert "winnow_rerank_queue_tokens 1200.0" in text
    assert "winnow_rerank_queue_seconds 4.5" in text
    assert "winnow_remote_calls_total 2.0" in text
    assert 'winnow_gpu_memory_used_bytes{device="0"} 5e+09' in text
    assert 'winnow_gpu_utilization_percent{device="1"} 40.0' in text
    assert 'winnow_torch_cuda_reserved_bytes{device="0"} 2e+09' in text
    assert "not_exported" not in text
