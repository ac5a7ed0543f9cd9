"""Score cache: an in-process LRU of P(yes) in front of every backend (``WINNOW_RERANK_CACHE_MB``).

Users who rerank a fixed set (an FAQ library, a catalogue) send the same (query, document) pairs again
and again; a hit costs a hash and a dict lookup instead of a forward pass, and only the misses of a
request reach the batcher (so only they count as queued work).

- **Key**: a 16-byte BLAKE2b digest of (engine identity, instruction, query, document). The identity
  names everything that changes a score: backend, model, dtype, ``max_length`` (the cut), and for the
  remote backend its URLs, format, model field and tokenizer. Only the digest is kept, never the texts.
- **Exact**: a hit returns the very float the engine returned for that pair, bit for bit.
- **Never stale**: the cache lives in the process (a restart starts empty) and another model is
  another key. A remote server can only change its model by restarting, so the remote backend moves
  its ``epoch`` whenever it sees the server unreachable (a failed call or ``/ready`` probe, 502-504)
  or its answers name another ``model``, and the cache is dropped then (``invalidations``); the hits
  of a request are re-scored when its own call is the one that saw the change.
- **Partitioned by caller** (``WINNOW_RERANK_CACHE_SCOPE=key``, the default): the key also holds
  :data:`CALLER`, a hash of the API key the request came with (set by the API's guard), so a hit —
  which is visible by its speed — only ever tells a caller about pairs it asked itself. ``shared``:
  one partition for everyone (a single tenant). docs/limits.md "Metrics and cache privacy".
- **Bounded in bytes**: each entry is charged :data:`ENTRY_BYTES` (digest + float + the ordered
  dict's node, measured with tracemalloc in tests); past ``max_bytes`` the least recently used go.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.rerank.base import Reranker, Sample, Stats, counter, gauge
from pipeline.rerank.prompt import resolve_instruction

if TYPE_CHECKING:
    from pipeline.config import RerankSettings
    from pipeline.rerank.cut import DocumentCutter

log = logging.getLogger(__name__)

DIGEST_BYTES = 16
# digest bytes object + float + the OrderedDict's slot and link node: 153 bytes on CPython 3.11
# (tracemalloc measures ~148 at 20,000 entries: tests/test_rerank_cache.py)
ENTRY_BYTES = sys.getsizeof(b"\0" * DIGEST_BYTES) + sys.getsizeof(0.5) + 80
HASH_IN_THREAD_CHARS = 1 << 20  # hash requests larger than this off the event loop
# The score-cache partition of the request being served ("" = shared): a hash of the caller's API key,
# set per request by pipeline/api/guard.py; tasks the request starts inherit it.
CALLER: ContextVar[str] = ContextVar("winnow_cache_caller", default="")


def identity(settings: RerankSettings) -> str:
    """Everything in the settings that changes a score; part of every key."""
    s = settings
    parts = [s.rerank_backend, s.rerank_model, s.rerank_dtype, str(s.rerank_max_length)]
    if s.rerank_backend == "remote":
        parts += [
            str(s.rerank_url),
            s.rerank_remote_format,
            str(s.rerank_remote_model),
            s.rerank_tokenizer,
        ]
    return "\x1f".join(parts)


@dataclass
class CacheStats(Stats):
    """What the score cache counts (a snapshot: :meth:`ScoreCache.counters`)."""

    hits: int = counter("rerank_cache_hits", "pairs answered from the score cache")
    misses: int = counter(
        "rerank_cache_misses", "pairs the score cache did not hold (scored by the reranker)"
    )
    evictions: int = counter(
        "rerank_cache_evictions", "score cache entries dropped to stay within its size"
    )
    invalidations: int = counter(
        "rerank_cache_invalidations", "times the score cache was emptied (remote model changed)"
    )
    entries: int = gauge("rerank_cache_entries", "pairs in the score cache")
    bytes: int = gauge("rerank_cache_bytes", "score cache size (bytes charged)")


class ScoreCache:
    """LRU of digest → score, bounded by ``max_bytes`` (each entry charged :data:`ENTRY_BYTES`)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_entries = max(0, max_bytes // ENTRY_BYTES)
        self._data: OrderedDict[bytes, float] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return len(self._data) * ENTRY_BYTES

    def __contains__(self, key: bytes) -> bool:
        """Held, without counting a hit or a miss or touching the LRU order (for planning)."""
        return key in self._data

    def get(self, key: bytes) -> float | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: float) -> None:
        if self.max_entries == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        if self._data:
            self.invalidations += 1
        self._data.clear()

    def counters(self) -> CacheStats:
        return CacheStats(
            self.hits, self.misses, self.evictions, self.invalidations, len(self._data), self.bytes
        )

    def stats(self) -> dict[str, int | float]:
        return self.counters().as_dict()


def pair_keys(ident: str, query: str, docs: Sequence[str], instruction: str | None) -> list[bytes]:
    """One digest per document; the shared part (identity, instruction, query) is hashed once."""
    head = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in (ident, resolve_instruction(instruction), query):
        data = part.encode("utf-8", "surrogatepass")
        head.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two splits collide
        head.update(data)
    keys = []
    for doc in docs:
        h = head.copy()
        h.update(doc.encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys


class CachedReranker(Reranker):
    """A Reranker whose repeated pairs come from a :class:`ScoreCache`; the rest of the contract
    goes to the reranker behind it (``inner``; :func:`unwrap` for backend-specific members)."""

    def __init__(self, inner: Reranker, cache: ScoreCache, ident: str) -> None:
        self.inner = inner
        self.cache = cache
        self.ident = ident
        self.backend = inner.backend
        self.model = inner.model
        self._epoch = inner.epoch

    def load(self) -> None:
        self.inner.load()

    def document_cutter(self) -> DocumentCutter | None:
        return self.inner.document_cutter()

    async def health(self) -> bool:
        return await self.inner.health()

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    async def score(
        self, query: str, docs: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        return await self.score_within(query, docs, instruction, math.inf)

    async def score_within(
        self, query: str, docs: Sequence[str], instruction: str | None, budget_s: float
    ) -> list[float]:
        """Hits are free; the misses go to the inner reranker within the budget. The answer is the
        leading documents up to the first miss it did not score (all of them: no budget)."""
        if not docs:
            return []
        t0 = time.monotonic()
        keys = await self._keys(query, docs, instruction)
        self._sync_epoch()
        scores: list[float | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, value in enumerate(scores) if value is None]
        if todo:
            left = budget_s - (time.monotonic() - t0)
            fresh = await self.inner.score_within(query, [docs[i] for i in todo], instruction, left)
            if self._sync_epoch() and len(todo) < len(docs):  # the hits may be the old model's
                todo = list(range(len(docs)))
                left = budget_s - (time.monotonic() - t0)
                fresh = await self.inner.score_within(query, docs, instruction, left)
            for i, value in zip(todo, fresh, strict=False):  # fresh: a prefix within a budget
                scores[i] = value
                self.cache.put(keys[i], value)
        out: list[float] = []
        for value in scores:
            if value is None:
                break
            out.append(float(value))
        return out

    async def affordable(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        budget_s: float = math.inf,
        free: Sequence[bool] | None = None,
    ) -> int:
        """The inner reranker's answer, with the pairs this cache holds counted as free."""
        if not docs:
            return 0
        keys = await self._keys(query, docs, instruction)
        held = [k in self.cache for k in keys]
        if free is not None:
            held = [h or f for h, f in zip(held, free, strict=True)]
        return await self.inner.affordable(query, docs, instruction, budget_s, held)

    async def _keys(self, query: str, docs: Sequence[str], instruction: str | None) -> list[bytes]:
        """The pairs' keys in the caller's partition (large requests hashed off the event loop)."""
        ident = self.ident
        caller = CALLER.get()
        if caller:
            ident = f"{ident}\x1fcaller={caller}"
        if sum(len(d) for d in docs) > HASH_IN_THREAD_CHARS:
            return await asyncio.to_thread(pair_keys, ident, query, docs, instruction)
        return pair_keys(ident, query, docs, instruction)

    def _sync_epoch(self) -> bool:
        """Drop the cache when the backend's ``epoch`` moved (remote: restart or another model)."""
        epoch = self.inner.epoch
        if epoch == self._epoch:
            return False
        self._epoch = epoch
        if len(self.cache):
            log.info("the rerank server may have changed (restart or model): score cache dropped")
        self.cache.clear()
        return True

    def samples(self) -> list[Sample]:
        return [*self.inner.samples(), *self.cache.counters().samples()]

    def stats(self) -> dict[str, int | float]:
        return {**self.inner.stats(), **self.cache.stats()}

    async def aclose(self) -> None:
        await self.inner.aclose()


def unwrap(reranker: Reranker) -> Any:
    """The backend behind a :class:`CachedReranker` (or the reranker itself), for its own members
    (a batcher, URLs): typed ``Any`` because those are not part of the contract."""
    return reranker.inner if isinstance(reranker, CachedReranker) else reranker
