"""A fast, deterministic :class:`~pipeline.rerank.base.RerankEngine` for tests: no torch, no model.

The score of a pair is a function of that pair alone (query/document word overlap, with a small
content hash to break ties), so it honours what the contract promises of a real engine: one score
in [0, 1] per document, in input order, independent of the other documents of the request and of
the requests merged with it. It counts its work in the engine's typed stats (a "token" is a word
here). ``seconds_per_pair`` makes it take time, for scheduling tests.

It is a test double: product code never builds it (the factory knows only hf, vllm and remote).
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections.abc import Sequence

from pipeline.rerank.base import EngineStats, RerankEngine, RerankRequest
from pipeline.rerank.prompt import resolve_instruction

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def fake_score(query: str, doc: str, instruction: str | None = None) -> float:
    """P(yes) of one pair: 0.9 × the share of the query's words the document has, plus up to 0.1
    from a hash of the pair (a tie-breaker), so always in [0, 1]."""
    q = set(words(query))
    d = set(words(doc))
    overlap = len(q & d) / len(q) if q else 0.0
    key = f"{resolve_instruction(instruction)}\x1f{query}\x1f{doc}".encode("utf-8", "surrogatepass")
    tie = (zlib.crc32(key) % 1000) / 1000
    return 0.9 * overlap + 0.1 * tie


class FakeEngine(RerankEngine):
    """Scores pairs by :func:`fake_score`; ``load()`` is free and the constructor cheap."""

    backend = "fake"

    def __init__(self, model: str = "fake", *, seconds_per_pair: float = 0.0) -> None:
        self.model = model
        self.seconds_per_pair = seconds_per_pair
        self.counters = EngineStats()
        self.loads = 0
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            self.loads += 1

    def stats(self) -> EngineStats:
        return self.counters

    def score_requests(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        out = [[fake_score(r.query, d, r.instruction) for d in r.docs] for r in requests]
        pairs = sum(len(r.docs) for r in requests)
        if self.seconds_per_pair > 0 and pairs:
            time.sleep(self.seconds_per_pair * pairs)
        with self._lock:
            st = self.counters
            st.requests_scored += len(requests)
            st.pairs_scored += pairs
            st.tokens_scored += sum(
                len(words(r.query)) + len(words(d)) for r in requests for d in r.docs
            )
            st.forward_passes += 1 if pairs else 0
            st.batches += 1
        return out
