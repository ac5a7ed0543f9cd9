"""Typed counters: each component's numbers as a :class:`Stats` dataclass whose fields are declared
with :func:`counter` or :func:`gauge`, naming the Prometheus metric and its help text where the number
is counted. ``/metrics`` exports them as declared (no list of names elsewhere), and a test iterates
:attr:`Stats.declared` to check each reaches ``/metrics``. Pure: no imports beyond the standard library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

MetricKind = Literal["counter", "gauge"]
METRIC = "winnow.metric"  # dataclass field metadata key


@dataclass(frozen=True, slots=True)
class Metric:
    """One exported number: its ``stats()`` key, Prometheus name (counters get ``_total`` on the
    wire), help text and kind."""

    key: str
    name: str
    help: str
    kind: MetricKind


def _declare(key: str, help: str, kind: MetricKind, name: str | None, default: float) -> Any:
    metric = Metric(key, name if name is not None else f"winnow_{key}", help, kind)
    return dataclasses.field(default=default, metadata={METRIC: metric})


def counter(key: str, help: str, *, name: str | None = None, default: float = 0) -> Any:
    """A monotonic counter field of a :class:`Stats` dataclass (``name``: default ``winnow_<key>``)."""
    return _declare(key, help, "counter", name, default)


def gauge(key: str, help: str, *, name: str | None = None, default: float = 0) -> Any:
    """A gauge field of a :class:`Stats` dataclass (a level, or the size of the last call)."""
    return _declare(key, help, "gauge", name, default)


Sample = tuple[Metric, float]


class Stats:
    """Base of the typed counter sets: subclasses are dataclasses whose fields are declared with
    :func:`counter` / :func:`gauge`; every subclass is registered for the /metrics test."""

    declared: ClassVar[list[type[Stats]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Stats.declared.append(cls)

    @classmethod
    def metrics(cls) -> list[tuple[str, Metric]]:
        """(field name, metric) of every declared field."""
        return [
            (f.name, f.metadata[METRIC])
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if METRIC in f.metadata
        ]

    def samples(self) -> Iterator[Sample]:
        for field_name, metric in self.metrics():
            yield metric, getattr(self, field_name)

    def as_dict(self) -> dict[str, int | float]:
        """The values under their ``stats()`` keys."""
        return {metric.key: value for metric, value in self.samples()}

    def reset(self) -> None:
        """Every declared field back to its default (after a warm-up)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if METRIC in f.metadata:
                setattr(self, f.name, f.default)


def declared_metrics() -> dict[str, Metric]:
    """Every metric declared by the :class:`Stats` classes imported so far, by name."""
    out: dict[str, Metric] = {}
    for cls in Stats.declared:
        for _, metric in cls.metrics():
            out[metric.name] = metric
    return out
