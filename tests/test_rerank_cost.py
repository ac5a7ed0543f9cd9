"""The reranker's cost model (pure arithmetic): a·n + b·n² per pair, learnt per length bucket.

Fast: no torch, no clock. A "true" engine cost is a known function; the model is fed the calls it
would have measured, and its predictions are compared with the truth.
"""

from __future__ import annotations

import pytest

from pipeline.rerank.cost import CostModel, bucket_of, fit_line

A, B = 1e-3, 2e-7  # true cost: seconds per pair = A·n + B·n² (attention ≈ linear work at n = 5,000)


def true_seconds(lengths: list[int]) -> float:
    return sum(A * n + B * n * n for n in lengths)


def profiled() -> CostModel:
    model = CostModel(start_tokens_per_s=100.0)
    model.set_profile([(100, true_seconds([100])), (1024, true_seconds([1024]))])
    return model


def test_buckets_are_powers_of_two() -> None:
    assert bucket_of(1) == bucket_of(64) == 0
    assert bucket_of(65) == bucket_of(128) == 1
    assert bucket_of(8192) == 7 and bucket_of(8193) == 8
    assert bucket_of(10**12) == 15


def test_fit_line_recovers_a_line_and_respects_signs() -> None:
    a, b = fit_line([(100, 1 + 2 * 100, 1), (1000, 1 + 2 * 1000, 1), (50, 1 + 2 * 50, 3)])
    assert a == pytest.approx(1) and b == pytest.approx(2)
    assert fit_line([]) is None
    assert fit_line([(5, 3.0, 1), (5, 5.0, 1)]) == (4.0, 0.0)  # one length: flat
    assert fit_line([(1, 5.0, 1), (10, 1.0, 1)])[1] == 0.0  # falling: flat, never negative
    a, b = fit_line([(1, 0.0, 1), (2, 10.0, 1)])  # negative intercept: through the origin
    assert a == 0.0 and b > 0


def test_flat_rate_before_any_measurement() -> None:
    model = CostModel(start_tokens_per_s=200.0)
    assert model.pair_seconds(400) == pytest.approx(2.0)
    assert model.line == (pytest.approx(1 / 200), 0.0)


def test_profile_at_two_lengths_predicts_long_pairs() -> None:
    """Two points fix a and b: an 8,192-token pair is predicted from a 100 and a 1,024-token one."""
    model = profiled()
    a, b = model.line
    assert a == pytest.approx(A, rel=1e-6) and b == pytest.approx(B, rel=1e-6)
    assert model.pair_seconds(8192) == pytest.approx(true_seconds([8192]), rel=1e-6)
    # the flat rate learnt on the short point would promise 8,192 tokens in a third of the time
    flat = 8192 * true_seconds([100]) / 100
    assert true_seconds([8192]) > 2.5 * flat


def test_a_heavy_request_does_not_poison_short_ones() -> None:
    """The issue's failure: one heavy request made a single rate collapse for everyone."""
    model = profiled()
    for _ in range(20):  # ordinary traffic: 20 documents of ~200 tokens per call
        model.observe([200] * 20, true_seconds([200] * 20))
    short_before = model.pair_seconds(200)
    # a heavy request that ran 1.5× slower than even the true quadratic (cache misses, …)
    for _ in range(30):
        model.observe([8192], 1.5 * true_seconds([8192]))
    assert model.pair_seconds(200) == pytest.approx(short_before, rel=0.1)
    assert model.pair_seconds(200) == pytest.approx(true_seconds([200]), rel=0.1)
    # and the long bucket learnt its own rate
    assert model.pair_seconds(8192) == pytest.approx(1.5 * true_seconds([8192]), rel=0.1)
    # a single tokens/s figure over the same work would now overestimate short pairs ~2×
    tokens = 20 * 20 * 200 + 30 * 8192
    seconds = 20 * true_seconds([200] * 20) + 30 * 1.5 * true_seconds([8192])
    assert 200 * seconds / tokens > 1.8 * true_seconds([200])


def test_mixed_calls_are_split_by_prediction_and_converge() -> None:
    """Calls that merge lengths still teach each bucket its rate (the truth is a·n + b·n²)."""
    model = CostModel(start_tokens_per_s=50.0)  # no profile: the flat start is 5× too slow
    mix = [100, 300, 700, 1500, 3000, 6000]
    for i in range(200):
        call = [mix[i % 6], mix[(i + 2) % 6], mix[(i + 3) % 6]]
        model.observe(call, true_seconds(call))
    for n in (100, 300, 1500, 6000, 8192):
        assert model.pair_seconds(n) == pytest.approx(true_seconds([n]), rel=0.25), n
    assert model.pair_seconds(8192) > 3 * model.pair_seconds(1500)


def test_unmeasured_lengths_follow_the_line() -> None:
    model = profiled()
    for _ in range(10):
        model.observe([256] * 8, true_seconds([256] * 8))
        model.observe([2048] * 2, true_seconds([2048] * 2))
    # 16,384 tokens was never seen: predicted by the fitted line within 10%
    assert model.pair_seconds(16384) == pytest.approx(true_seconds([16384]), rel=0.1)
    snap = model.snapshot()
    assert snap["b_s_per_token2"] > 0 and "bucket_256_tokens_per_s" in snap


def test_nothing_learnt_from_empty_or_zero_calls() -> None:
    model = profiled()
    before = model.line
    model.observe([], 1.0)
    model.observe([100], 0.0)
    assert model.line == before


def test_a_noisy_profile_point_is_forgotten() -> None:
    """A neighbour's burst during the start-up profile (2× too slow at 256 tokens) fades with work."""
    model = CostModel()
    model.set_profile([(100, true_seconds([100])), (256, 2 * true_seconds([256]))])
    assert model.pair_seconds(256) > 1.8 * true_seconds([256])
    for _ in range(40):
        model.observe([256] * 4, true_seconds([256] * 4))
        model.observe([100] * 4, true_seconds([100] * 4))
    assert model.pair_seconds(256) == pytest.approx(true_seconds([256]), rel=0.15)
    assert model.line[1] < 2 * B  # the steep slope the outlier implied is gone


def test_a_profile_point_beyond_quadratic_growth_is_cut() -> None:
    """Measured on a contended host: 4.4 s for 122 tokens, then 36 s for 260 (3.8× per token, where
    even pure attention allows 260/122 = 2.1×)."""
    model = CostModel()
    model.set_profile([(260, 36.0), (122, 4.4166)])
    (n1, s1), (n2, s2) = model.profile
    assert (n1, n2) == (122, 260)
    assert s2 == pytest.approx(s1 * 260 / 122)
    assert model.pair_seconds(260) == pytest.approx(4.4166 * (260 / 122) ** 2, rel=0.01)
