"""/metrics families: the reranker's declared counters (every one of them reaches /metrics), the other
components' counters, and per-device labels."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client import generate_latest

import pipeline.rerank.backends.hf.engine
import pipeline.rerank.backends.vllm
from pipeline.api.metrics import Metrics
from pipeline.rerank.backends.remote.reranker import RemoteReranker, RemoteStats
from pipeline.rerank.base import Metric, Reranker, Sample, Stats, declared_metrics
from pipeline.rerank.batcher import BatchedReranker, BatcherStats, MicroBatcher
from pipeline.rerank.cache import CachedReranker, ScoreCache
from pipeline.rerank.cut import DocumentCutter
from testkit.fake_engine import FakeEngine
from testkit.tiny_qwen import build_bpe_tokenizer


def scrape(samples: Iterable[Sample], stats: dict | None = None) -> str:
    metrics = Metrics(lambda: stats or {}, lambda: list(samples))
    return generate_latest(metrics.registry).decode()


def exported(metric: Metric, text: str) -> bool:
    name = f"{metric.name}_total" if metric.kind == "counter" else metric.name
    return any(line.split(" ")[0] == name for line in text.splitlines())


def product_declarations() -> list[type[Stats]]:
    return [c for c in Stats.declared if c.__module__.startswith("pipeline.")]


def test_counters_gauges_and_device_labels() -> None:
    samples = [
        *BatcherStats(requests=3, queue_tokens=1200, queue_seconds=4.5).samples(),
        *RemoteStats(calls=2).samples(),
    ]
    stats = {
        "milvus_inflight": 2,
        "gpu0_memory_used_bytes": 5e9,
        "gpu1_utilization_percent": 40.0,
        "torch_cuda0_reserved_bytes": 2e9,
        "not_exported": 1,
    }
    text = scrape(samples, stats)
    assert "winnow_rerank_requests_total 3.0" in text
    assert "winnow_rerank_queue_tokens 1200.0" in text
    assert "winnow_rerank_queue_seconds 4.5" in text
    assert "winnow_remote_calls_total 2.0" in text
    assert "winnow_milvus_inflight 2.0" in text
    assert 'winnow_gpu_memory_used_bytes{device="0"} 5e+09' in text
    assert 'winnow_gpu_utilization_percent{device="1"} 40.0' in text
    assert 'winnow_torch_cuda_reserved_bytes{device="0"} 2e+09' in text
    assert "not_exported" not in text


def test_declarations_are_consistent() -> None:
    """One name, one meaning: a metric declared by two components has the same kind, and names
    follow Prometheus' rules (counters get ``_total`` on the wire, so no name carries it)."""
    seen: dict[str, Metric] = {}
    for cls in product_declarations():
        for _, metric in cls.metrics():
            assert metric.name.startswith("winnow_") and not metric.name.endswith("_total")
            prev = seen.setdefault(metric.name, metric)
            assert prev.kind == metric.kind, metric.name
            assert metric.help
    # the names dashboards and docs use are still there
    for name in (
        "winnow_rerank_requests",
        "winnow_rerank_merged_dispatches",
        "winnow_rerank_tokens",
        "winnow_rerank_forward_passes",
        "winnow_rerank_queue_depth",
        "winnow_rerank_cache_hits",
        "winnow_remote_calls",
        "winnow_rerank_cached_tokens",
        "winnow_rerank_cut_documents",
        "winnow_rerank_inexact_cuts",
    ):
        assert name in declared_metrics()


def test_every_declared_counter_reaches_metrics() -> None:
    """Every counter a product Stats class declares is exported by the reranker that owns it."""
    tokenizer = build_bpe_tokenizer()
    fake = FakeEngine()
    local = CachedReranker(
        BatchedReranker(fake, "fake", MicroBatcher(fake)), ScoreCache(1 << 20), "fake"
    )
    hf_engine = pipeline.rerank.backends.hf.engine.HFEngine("unloaded")  # counters need no model
    hf = BatchedReranker(hf_engine, "hf", MicroBatcher(hf_engine))
    vllm_engine = pipeline.rerank.backends.vllm.VLLMEngine("unloaded")
    vllm_engine._cutter = DocumentCutter(tokenizer, 512)  # what load() builds
    vllm = BatchedReranker(vllm_engine, "vllm", MicroBatcher(vllm_engine))
    remote = RemoteReranker("http://127.0.0.1:9/rerank", model="m")
    remote._cutter = DocumentCutter(tokenizer, 512)  # what load() builds with a tokenizer
    rerankers: list[Reranker] = [local, hf, vllm, remote]
    asyncio.run(local.score("q", ["a q", "b"]))  # the counters move, and still reach /metrics

    covered: set[str] = set()
    for reranker in rerankers:
        samples = reranker.samples()
        names = [m.name for m, _ in samples]
        assert len(names) == len(set(names)), f"a metric reported twice by {reranker.backend}"
        text = scrape(samples)
        for metric, value in samples:
            assert isinstance(value, int | float), metric
            assert exported(metric, text), f"{metric.name} declared but not on /metrics"
            covered.add(metric.name)
        assert reranker.stats().keys() >= {m.key for m, _ in samples}
    missing = [
        f"{cls.__name__}.{field}: {metric.name}"
        for cls in product_declarations()
        for field, metric in cls.metrics()
        if metric.name not in covered
    ]
    assert not missing, f"declared counters no reranker exports: {missing}"
    assert "winnow_rerank_cache_hits_total 0.0" in scrape(local.samples())
    assert "winnow_rerank_cache_misses_total 2.0" in scrape(local.samples())
    for r in rerankers:
        asyncio.run(r.aclose())
