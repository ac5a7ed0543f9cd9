"""Prometheus metrics: per-route counts/latency, per-stage latency, and reranker/batcher counters."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.breaker import metric_families as breaker_metric_families

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StatsCollector(Collector):
    """Reads the batcher's and engine's plain counters at scrape time (no locking on the hot path)."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        s = self.source()
        counters = {
            "rerank_requests": "rerank requests submitted to the batcher",
            "rerank_dispatches": "engine calls made by the batcher",
            "rerank_merged_dispatches": "engine calls that merged several requests",
            "rerank_pairs": "query-document pairs scored",
            "rerank_tokens": "tokens run through the reranker (padding excluded)",
            "rerank_forward_passes": "reranker forward passes",
            "rerank_dropped": "requests dropped because their client went away",
            "rerank_rejected": "requests rejected with 429 (queue full)",
            "rerank_slices": "slices of requests dispatched to the engine",
            "rerank_estimated_tokens": "estimated tokens admitted (the unit of admission)",
            "rerank_dropped_pairs": "pairs dropped because their client went away",
            "rerank_refused_deadline": "requests refused up front: they could not meet the deadline",
            "rerank_deadline_missed": "requests admitted, then answered 503 at the deadline: "
            "they ran slower than predicted",
            "rerank_too_large": "requests refused with 413: more work than one request may carry",
            "rerank_failed": "requests whose scoring failed",
            "rerank_cache_hits": "pairs answered from the score cache",
            "rerank_cache_misses": "pairs the score cache did not hold (scored by the reranker)",
            "rerank_cache_evictions": "score cache entries dropped to stay within its size",
            "rerank_cache_invalidations": "times the score cache was emptied (remote model changed)",
            "remote_calls": "HTTP calls to the remote reranker",
            "remote_retries": "remote reranker calls retried",
            "remote_errors": "remote reranker calls that failed",
            "remote_unavailable": "requests answered 503 because the remote reranker was down",
            "remote_latency_seconds_sum": "seconds spent in remote reranker calls",
            "remote_latency_seconds_count": "remote reranker calls timed",
        }
        for name, doc in counters.items():
            if name in s:
                yield CounterMetricFamily(f"winnow_{name}", doc, value=s[name])
        if "queue_depth" in s:
            yield GaugeMetricFamily(
                "winnow_rerank_queue_depth",
                "requests waiting for the reranker",
                value=s["queue_depth"],
            )
        gauges = {
            "queue_tokens": ("winnow_rerank_queue_tokens", "estimated tokens waiting"),
            "queue_seconds": (
                "winnow_rerank_queue_seconds",
                "predicted seconds of rerank work waiting or running (the cost model)",
            ),
            "rerank_tokens_per_s": ("winnow_rerank_tokens_per_s", "measured throughput"),
            "last_dispatch_tokens": ("winnow_rerank_last_batch_tokens", "tokens in the last call"),
            "rerank_cache_entries": ("winnow_rerank_cache_entries", "pairs in the score cache"),
            "rerank_cache_bytes": ("winnow_rerank_cache_bytes", "score cache size (bytes charged)"),
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
        if "remote_inflight" in s:
            yield GaugeMetricFamily(
                "winnow_rerank_remote_inflight",
                "remote reranker calls in flight",
                value=s["remote_inflight"],
            )
        if "last_dispatch_pairs" in s:
            yield GaugeMetricFamily(
                "winnow_rerank_last_batch_pairs",
                "pairs in the last dispatch",
                value=s["last_dispatch_pairs"],
            )


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
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
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
        self.registry.register(_StatsCollector(stats))
