"""A circuit breaker: stop calling a dependency that keeps failing, and try it again after a pause.

Pure logic with an injectable clock (no I/O, no threads of its own), shared by the Milvus store and the
remote reranker. ``closed``: calls go through and consecutive failures are counted; ``threshold`` of
them in a row open it. ``open``: calls are refused at once (the caller answers 503 with
``retry_after()``) for ``cooldown`` seconds. ``half_open``: after the cool-down one trial is let
through (a background probe, or the next call); its success closes the breaker, its failure opens it
for another cool-down. A trial that never reports back (its caller was cancelled) is forgotten after
``trial_timeout`` seconds and another one is let through.

Thread-safe (one small lock): the store reports from worker threads, the reranker from the event loop.
The breaker's metrics are declared here, where they are counted (:func:`metric_families`), and reach
``/metrics`` through the stats of the component that owns the breaker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}
STATS_PREFIX = "breaker_"


class Breaker:
    """Consecutive-failure circuit breaker; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        threshold: int = 3,
        cooldown: float = 2.0,
        trial_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be above 0")
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.trial_timeout = trial_timeout if trial_timeout is not None else max(cooldown, 1.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._is_open = False
        self._trial_at: float | None = None  # when the half-open trial was let through
        self.opened = 0  # times the breaker opened (a counter for /metrics)

    def _state(self, now: float) -> State:
        if not self._is_open:
            return "closed"
        return "open" if now - self._opened_at < self.cooldown else "half_open"

    @property
    def state(self) -> State:
        with self._lock:
            return self._state(self._clock())

    def allow(self) -> bool:
        """May a call go out now? Closed: yes. Open: no. Half-open: yes for one trial at a time."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            if state == "closed":
                return True
            if state == "open":
                return False
            if self._trial_at is not None and now - self._trial_at < self.trial_timeout:
                return False  # a trial is out: the others wait for its answer
            self._trial_at = now
            return True

    def retry_after(self) -> float:
        """Seconds until a call may be tried again (0 when closed)."""
        with self._lock:
            if not self._is_open:
                return 0.0
            return max(0.0, self.cooldown - (self._clock() - self._opened_at))

    def success(self) -> None:
        """The dependency answered: close (or stay closed) and forget the failures."""
        with self._lock:
            self._failures, self._is_open, self._trial_at = 0, False, None

    def failure(self) -> None:
        """The dependency failed (unreachable, timed out): count it; open at the threshold.

        A failure while open or half-open (the trial, or a call that started before the breaker
        opened) starts a new cool-down.
        """
        with self._lock:
            now = self._clock()
            if self._is_open:
                if self._state(now) == "half_open":
                    self._opened_at, self._trial_at = now, None
                return
            self._failures += 1
            if self._failures >= self.threshold:
                self._is_open, self._opened_at, self._trial_at = True, now, None
                self.opened += 1

    def stats(self) -> dict[str, int]:
        """``breaker_<name>_state`` (0 closed, 1 half-open, 2 open) and ``breaker_<name>_opened``."""
        with self._lock:
            state = self._state(self._clock())
            return {
                f"{STATS_PREFIX}{self.name}_state": STATE_VALUE[state],
                f"{STATS_PREFIX}{self.name}_opened": self.opened,
            }


def metric_families(stats: dict[str, Any]) -> Iterator[Any]:
    """``winnow_breaker_state{breaker=…}`` and ``winnow_breaker_opened_total{breaker=…}`` from the
    ``breaker_<name>_state`` / ``breaker_<name>_opened`` entries of a stats dict."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily(
        "winnow_breaker_state",
        "circuit breaker state: 0 closed, 1 half-open (probing), 2 open (failing fast)",
        labels=["breaker"],
    )
    opened = CounterMetricFamily(
        "winnow_breaker_opened",
        "times the circuit breaker opened (the dependency kept failing)",
        labels=["breaker"],
    )
    seen = False
    for key, value in stats.items():
        if not key.startswith(STATS_PREFIX):
            continue
        name, _, what = key[len(STATS_PREFIX) :].rpartition("_")
        if what == "state":
            state.add_metric([name], float(value))
            seen = True
        elif what == "opened":
            opened.add_metric([name], float(value))
            seen = True
    if seen:
        yield state
        yield opened
