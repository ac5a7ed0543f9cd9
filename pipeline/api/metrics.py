"""Prometheus metrics: per-route counts/latency, per-stage latency, and reranker/batcher counters."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.breaker import metric_families as breaker_metric_families
from pipeline.rerank.base import Sample

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def sample_families(samples: Iterable[Sample]) -> Iterator[Any]:
    """One family per declared metric (:class:`~pipeline.rerank.base.Metric`), as it is declared
    where it is counted: no list of names here. A name reported twice keeps its first value."""
    seen: set[str] = set()
    for metric, value in samples:
        if metric.name in seen:
            continue
        seen.add(metric.name)
        if metric.kind == "counter":
            yield CounterMetricFamily(metric.name, metric.help, value=value)
        else:
            yield GaugeMetricFamily(metric.name, metric.help, value=value)


class _StatsCollector(Collector):
    """Reads the reranker's declared samples and the other components' plain counters at scrape
    time (no locking on the hot path)."""

    def __init__(
        self,
        source: Callable[[], dict[str, Any]],
        samples: Callable[[], Iterable[Sample]],
    ) -> None:
        self.source = source
        self.samples = samples

    def collect(self) -> Iterator[Any]:
        yield from sample_families(self.samples())
        s = self.source()
        gauges = {
            "milvus_inflight": ("winnow_milvus_inflight", "Milvus calls holding a store thread"),
            "write_queue_depth": ("winnow_write_queue_depth", "write requests running or waiting"),
            "write_queue_chars": (
                "winnow_write_queue_chars",
                "characters of text in the write queue",
            ),
        }
        for key, (name, doc) in gauges.items():
            if key in s:
                yield GaugeMetricFamily(name, doc, value=s[key])
        yield from _device_gauges(s)
        yield from breaker_metric_families(s)


DEVICE_KEY = re.compile(r"^(gpu|torch_cuda)(\d+)_(\w+)$")


def _device_gauges(stats: dict[str, Any]) -> Iterator[Any]:
    """``gpu0_memory_used_bytes`` → ``winnow_gpu_memory_used_bytes{device="0"}`` (and torch's own)."""
    families: dict[str, GaugeMetricFamily] = {}
    for key, value in stats.items():
        m = DEVICE_KEY.match(key)
        if m is None:
            continue
        kind, device, what = m.groups()
        name = f"winnow_{kind}_{what}"
        if name not in families:
            families[name] = GaugeMetricFamily(name, f"{kind} {what} per device", labels=["device"])
        families[name].add_metric([device], float(value))
    yield from families.values()


class Metrics:
    """The app's registry: HTTP and stage histograms, the reranker's declared samples, and the
    store's, writes', breakers' and devices' counters from ``stats``."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        samples: Callable[[], Iterable[Sample]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "winnow_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "winnow_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "winnow_stage_seconds",
            "search stage latency",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_pairs = Histogram(
            "winnow_rerank_request_pairs",
            "documents per rerank request",
            buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(stats, samples))
