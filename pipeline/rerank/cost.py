"""How long a pair takes, from its length: the reranker's cost model (pure arithmetic, no torch).

A (query, document) pair of ``n`` tokens costs about ``a·n + b·n²`` seconds: ``a`` is the linear work
per token (the GEMMs of every layer), ``b·n`` the attention each token pays over the ``n`` before it. One
tokens-per-second figure cannot hold both: learnt on short pairs it admits long ones that then run
far slower than promised (issue 27: 30 × 8,192-token pairs admitted for 60 s took 77 s), and learnt on
a long one it makes every short request look slow (a burst of ordinary requests got 429).

So the model is kept per **length bucket** (powers of two of the pair's tokens):

- **Prior**: per-token seconds ``a + b·n``, a line fitted (weighted least squares, ``a, b ≥ 0``)
  through every bucket's measured rate, weighted by how much work that bucket has seen; the start-up
  profile (pairs of several lengths) seeds the buckets, so newer work decays it like any other. A
  bucket never measured is predicted by the line.
- **Buckets**: each keeps decayed sums of the tokens it ran and the seconds attributed to them; its
  per-token cost is those sums blended with the prior (worth :data:`PRIOR_TOKENS` tokens), so the prior
  fades as the bucket's own work accumulates. Newer work outweighs older (half-life
  :data:`HALF_LIFE_TOKENS` of the bucket's own tokens).
- **Attribution**: one engine call mixes lengths; its measured seconds are split over its buckets in
  proportion to what the model predicted for each, so a call that ran 2× slower than predicted tells
  each bucket it ran 2× slower. A heavy request thus moves the long buckets, and the short ones only
  through the line (worth :data:`PRIOR_TOKENS` against their own evidence).

Units: the batcher passes engine tokens as its start-up profile measured them against its
character estimate (``MicroBatcher.token_scale``), capped at the pair limit; the per-bucket rates
absorb what bias is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MIN_BUCKET = (
    64  # bucket k holds pairs of (MIN_BUCKET·2^(k-1), MIN_BUCKET·2^k] tokens; bucket 0 ≤ 64
)
MAX_BUCKETS = 16  # up to 64·2^15 = 2M tokens: far past any pair limit
HALF_LIFE_TOKENS = 32768.0  # a bucket's older measurements weigh half after this much newer work
PRIOR_TOKENS = 2048.0  # the prior counts as this many tokens of evidence in a bucket


def bucket_of(tokens: float) -> int:
    """The length bucket of a pair of ``tokens`` estimated tokens."""
    if tokens <= MIN_BUCKET:
        return 0
    return min(MAX_BUCKETS - 1, math.ceil(math.log2(tokens / MIN_BUCKET)))


def fit_line(points: Iterable[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Weighted least squares of ``y = a + b·x`` over (x, y, weight), with ``a, b ≥ 0``.

    None without any weighted point. One distinct x (or a negative slope) → a flat line through the
    weighted mean; a negative intercept → a line through the origin.
    """
    sw = sx = sy = sxx = sxy = 0.0
    for x, y, w in points:
        if w <= 0:
            continue
        sw += w
        sx += w * x
        sy += w * y
        sxx += w * x * x
        sxy += w * x * y
    if sw <= 0:
        return None
    mean_x, mean_y = sx / sw, sy / sw
    var = sxx / sw - mean_x * mean_x
    if var <= 1e-12 * max(1.0, mean_x * mean_x):
        return max(mean_y, 0.0), 0.0
    b = (sxy / sw - mean_x * mean_y) / var
    if b <= 0:
        return max(mean_y, 0.0), 0.0
    a = mean_y - b * mean_x
    if a < 0:  # through the origin: y = b·x
        return 0.0, max(sxy / sxx, 0.0)
    return a, b


@dataclass
class _Bucket:
    tokens: float = 0.0  # decayed tokens measured
    seconds: float = 0.0  # decayed seconds attributed to them
    pairs: float = 0.0  # decayed pairs: tokens / pairs is where the bucket's rate was measured

    @property
    def length(self) -> float:
        return self.tokens / self.pairs


@dataclass
class CostModel:
    """Seconds of engine work for pairs of given lengths; see the module docstring.

    ``start_tokens_per_s`` is the rate assumed before any measurement or profile (flat: ``b = 0``).
    """

    start_tokens_per_s: float = 100.0
    profile: list[tuple[float, float]] = field(
        default_factory=list
    )  # (tokens, s/token) at start-up
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    _line: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        self._refit()

    # --- prediction -----------------------------------------------------------------------------
    @property
    def line(self) -> tuple[float, float]:
        """(a, b): seconds per token = a + b·tokens, the prior of every bucket."""
        return self._line

    def per_token(self, tokens: float) -> float:
        """Predicted seconds per token for a pair of ``tokens`` estimated tokens."""
        a, b = self._line
        line = a + b * tokens
        bucket = self._buckets.get(bucket_of(tokens))
        if bucket is None or bucket.tokens <= 0 or line <= 0:
            return line
        at = a + b * bucket.length  # the bucket's rate was measured there: keep the line's slope
        blended = (bucket.seconds + PRIOR_TOKENS * at) / (bucket.tokens + PRIOR_TOKENS)
        return blended * line / at if at > 0 else blended

    def pair_seconds(self, tokens: float) -> float:
        """Predicted seconds for one pair of ``tokens`` estimated tokens."""
        return tokens * self.per_token(tokens)

    def seconds(self, lengths: Iterable[float]) -> float:
        return sum(self.pair_seconds(n) for n in lengths)

    def tokens_per_s(self, tokens: float) -> float:
        """Predicted throughput for pairs of this length (for messages and metrics)."""
        return 1.0 / max(self.per_token(tokens), 1e-12)

    # --- learning -------------------------------------------------------------------------------
    def set_profile(self, points: Sequence[tuple[float, float]]) -> tuple[float, float]:
        """Seed the buckets (and so the line) from start-up measurements: (pair tokens, seconds per
        pair); returns (a, b). A point slower than quadratic growth from the one before it allows (a
        neighbour's burst on a shared host) is cut to that bound."""
        profile: list[tuple[float, float]] = []
        for n, s in sorted(p for p in points if p[0] > 0 and p[1] > 0):
            per_token = s / n
            if profile:  # a pair's time grows at most with n² (all attention): more is noise
                prev_n, prev = profile[-1]
                per_token = min(per_token, prev * n / prev_n)
            profile.append((n, per_token))
        self.profile = profile
        for n, per_token in self.profile:  # each point also seeds its bucket: its own measured rate
            bucket = self._buckets.setdefault(bucket_of(n), _Bucket())
            bucket.tokens += n
            bucket.seconds += n * per_token
            bucket.pairs += 1
        self._refit()
        return self._line

    def observe(self, lengths: Sequence[float], seconds: float) -> None:
        """Fold one engine call (its pairs' estimated tokens, its measured seconds) into the buckets."""
        if seconds <= 0 or not lengths:
            return
        predicted: dict[int, float] = {}
        tokens: dict[int, float] = {}
        pairs: dict[int, int] = {}
        for n in lengths:
            if n <= 0:
                continue
            k = bucket_of(n)
            predicted[k] = predicted.get(k, 0.0) + self.pair_seconds(n)
            tokens[k] = tokens.get(k, 0.0) + n
            pairs[k] = pairs.get(k, 0) + 1
        total = sum(predicted.values())
        if total <= 0:
            return
        for k, p in predicted.items():
            bucket = self._buckets.setdefault(k, _Bucket())
            decay = 0.5 ** (tokens[k] / HALF_LIFE_TOKENS)
            bucket.tokens = bucket.tokens * decay + tokens[k]
            bucket.seconds = bucket.seconds * decay + seconds * p / total
            bucket.pairs = bucket.pairs * decay + pairs[k]
        self._refit()

    def _refit(self) -> None:
        # the profile is in its buckets, where newer work decays it: one noisy start-up measurement
        # (a neighbour's burst on a shared host) must not hold the line forever
        points = [
            (b.length, b.seconds / b.tokens, b.tokens)
            for b in self._buckets.values()
            if b.tokens > 0
        ]
        line = fit_line(points)
        self._line = line if line is not None else (1.0 / self.start_tokens_per_s, 0.0)

    def snapshot(self) -> dict[str, float]:
        """The line and each measured bucket's rate, for logs and benchmarks."""
        a, b = self._line
        out = {"a_s_per_token": a, "b_s_per_token2": b}
        for k in sorted(self._buckets):
            length = self._buckets[k].length
            out[f"bucket_{int(MIN_BUCKET * 2**k)}_tokens_per_s"] = self.tokens_per_s(length)
        return out
