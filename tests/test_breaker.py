"""The circuit breaker's state machine (pure logic, a fake clock: no sleeping, no timing)."""

from __future__ import annotations

import pytest

from pipeline.breaker import Breaker, metric_families


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 2.0) -> tuple[Breaker, Clock]:
    clock = Clock()
    return Breaker("dep", threshold=threshold, cooldown=cooldown, clock=clock), clock


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b, _ = make(threshold=3)
    b.failure()
    b.failure()
    b.success()  # an answer in between resets the count
    b.failure()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and b.opened == 1
    assert not b.allow()
    assert b.retry_after() == pytest.approx(2.0)


def test_half_open_lets_one_trial_through_and_its_success_closes() -> None:
    b, clock = make()
    for _ in range(3):
        b.failure()
    clock.now += 1.0
    assert b.state == "open" and not b.allow()
    assert b.retry_after() == pytest.approx(1.0)
    clock.now += 1.0
    assert b.state == "half_open"
    assert b.allow()  # the trial
    assert not b.allow()  # the others wait for its answer
    b.success()
    assert b.state == "closed" and b.allow() and b.retry_after() == 0.0
    assert b.opened == 1


def test_failed_trial_reopens_for_another_cooldown() -> None:
    b, clock = make(cooldown=2.0)
    for _ in range(3):
        b.failure()
    clock.now += 2.5
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    assert b.retry_after() == pytest.approx(2.0)
    assert b.opened == 1  # still the same outage
    clock.now += 2.0
    assert b.state == "half_open" and b.allow()


def test_a_trial_that_never_reports_is_forgotten() -> None:
    b = Breaker("dep", threshold=1, cooldown=1.0, trial_timeout=5.0, clock=(clock := Clock()))
    b.failure()
    clock.now += 1.0
    assert b.allow()
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.5
    assert b.allow()  # the first trial's caller vanished: another may try


def test_failures_of_calls_started_before_the_opening_do_not_extend_it() -> None:
    b, clock = make(threshold=1, cooldown=2.0)
    b.failure()
    clock.now += 1.5
    b.failure()  # a slow call that started while closed, failing now
    assert b.retry_after() == pytest.approx(0.5)


def test_metric_families_from_stats() -> None:
    b, _ = make(threshold=1)
    b.failure()
    stats = {**b.stats(), "other": 1}
    assert stats["breaker_dep_state"] == 2 and stats["breaker_dep_opened"] == 1
    families = {f.name: f for f in metric_families(stats)}
    assert set(families) == {"winnow_breaker_state", "winnow_breaker_opened"}
    (state,) = families["winnow_breaker_state"].samples
    assert state.labels == {"breaker": "dep"} and state.value == 2
    assert list(metric_families({"other": 1})) == []


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Breaker("x", threshold=0)
    with pytest.raises(ValueError):
        Breaker("x", cooldown=0)
