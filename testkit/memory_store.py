"""An in-memory store for the fast test tier: the store contract without Milvus.

A test double only: product code never selects it (it lives in ``testkit/``, and
``pipeline/runtime.py`` builds a ``MilvusStore``); a test hands it to ``Runtime``/``SearchService``
itself. It passes the same contract tests as Milvus Lite and the ``milvus-lite server``
(``tests/test_store_contract.py``) and does the real work, small: exact dense search by the
collection's metric (COSINE), a real BM25 over the stored ``search_text`` (Milvus's defaults
k1 = 1.2, b = 0.75, its IDF, and an analyzer like the ``standard`` one: lowercased words), hybrid through the same fusion registry (:mod:`pipeline.fusion`), and the
subset of Milvus's filter language the service and its tests use (comparisons of ``id``,
``doc_id``, ``chunk``, ``title``, ``text`` and ``metadata["key"]``, ``in``/``not in`` lists,
``and``/``or``/``not``, parentheses); any other filter is an ``InvalidFilter``, as Milvus refuses
what it cannot parse. Every read sees every write before it (Strong).

Stop words are kept, as Milvus does: measured with milvus-lite 3.2.2, the ``standard`` analyzer's
``stop`` filter (``_english_``) removes nothing (a query of only "the and of" matches), and with
stop words counted this BM25 gives Milvus Lite's scores within a few percent
(``tests/test_store_contract.py::test_memory_store_ranks_like_milvus_lite``).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.domain import Hit, Passage
from pipeline.store import InvalidFilter, StoreError, VectorStore

K1, B = 1.2, 0.75  # Milvus's BM25 defaults


def analyze(text: str) -> list[str]:
    """Lowercased words (what Milvus's ``standard`` analyzer indexes; see the module docstring)."""
    return re.findall(r"\w+", text.lower())


@dataclass(slots=True)
class _Row:
    passage: Passage
    vector: np.ndarray  # float32, as given
    terms: Counter[str]

    def field(self, name: str) -> Any:
        p = self.passage
        return {"id": p.id, "doc_id": p.doc_id, "chunk": p.chunk, "title": p.title, "text": p.text}[
            name
        ]

    def hit(self, score: float) -> Hit:
        p = self.passage
        return Hit(p.id, p.doc_id, p.chunk, p.title, p.text, dict(p.metadata), float(score))


class MemoryStore(VectorStore):
    """The store contract over a dict of rows (see the module docstring). Thread-safe."""

    def __init__(
        self,
        collection: str = "memory",
        *,
        fusion: str = "rrf",
        rrf_k: int = 5,
        fusion_weights: tuple[float, float] = (0.5, 0.5),
    ) -> None:
        super().__init__(collection, fusion=fusion, rrf_k=rrf_k, fusion_weights=fusion_weights)
        self.uri = f"memory://{collection}"
        self._rows: dict[str, _Row] | None = None  # None: no collection
        self._lock = threading.Lock()

    # --- collection ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._rows is not None

    def open(self) -> tuple[str | None, int | None]:
        return (self.model, self.dim) if self._rows is not None else (None, None)

    def ensure_collection(self, dim: int, model: str) -> None:
        with self._lock:
            if self._rows is not None:
                self.check_model(self.model, self.dim, model, dim)
                return
            self._rows, self.model, self.dim = {}, model, dim

    def drop(self) -> None:
        with self._lock:
            self._rows, self.model, self.dim = None, None, None

    def _table(self) -> dict[str, _Row]:
        if self._rows is None:
            raise StoreError(f"collection {self.collection!r} does not exist")
        return self._rows

    # --- writes ----------------------------------------------------------------------------
    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        if len(passages) != len(vectors):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")
        if not passages:
            return 0
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(
                f"vectors of dimension {vecs.shape[-1]}, the collection has {self.dim}"
            )
        with self._lock:
            table = self._table()
            for p, v in zip(passages, vecs, strict=True):
                table[p.id] = _Row(p, v.copy(), Counter(analyze(p.search_text)))
        return len(passages)

    def delete(self, ids: Sequence[str]) -> None:
        with self._lock:
            table = self._table()
            for i in ids:
                table.pop(i, None)

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        docs = set(doc_ids)
        with self._lock:
            table = self._table()
            for i in [i for i, r in table.items() if r.passage.doc_id in docs]:
                del table[i]

    # --- reads -----------------------------------------------------------------------------
    def _select(self, filter: str) -> list[_Row]:
        match = compile_filter(filter)
        with self._lock:
            return [r for r in self._table().values() if match(r)]

    def ids_by_doc(self, doc_ids: Sequence[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        docs = set(doc_ids)
        for r in self._select(""):
            if r.passage.doc_id in docs:
                out[r.passage.doc_id].add(r.passage.id)
        return out

    def passages_of(self, doc_id: str, limit: int) -> list[Hit]:
        rows = [r for r in self._select("") if r.passage.doc_id == doc_id]
        rows.sort(key=lambda r: (r.passage.chunk, r.passage.id))
        return [r.hit(0.0) for r in rows[:limit]]

    def count(self, filter: str = "") -> int:
        return len(self._select(filter))

    # --- search ----------------------------------------------------------------------------
    @staticmethod
    def _check_k(k: int) -> None:
        if k < 1:
            raise StoreError(f"search limit must be at least 1, not {k}")

    @staticmethod
    def _best(scored: list[tuple[float, _Row]], k: int) -> list[Hit]:
        scored.sort(key=lambda e: (-e[0], e[1].passage.id))
        return [r.hit(s) for s, r in scored[:k]]

    def dense(self, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
        """Exact COSINE similarity (the collection's metric), best first."""
        self._check_k(k)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise StoreError(
                f"query vector of dimension {q.shape[0]}, the collection has {self.dim}"
            )
        qn = float(np.linalg.norm(q)) or 1.0
        scored = []
        for r in self._select(filter):
            vn = float(np.linalg.norm(r.vector)) or 1.0
            scored.append((float(np.dot(r.vector, q)) / (vn * qn), r))
        return self._best(scored, k)

    def bm25(self, text: str, k: int, filter: str = "") -> list[Hit]:
        """Okapi BM25 of the query's terms over every stored passage (statistics of the whole
        collection, as Milvus keeps them); passages sharing no term are not returned."""
        self._check_k(k)
        query = Counter(analyze(text))
        with self._lock:
            everything = list(self._table().values())
        rows = self._select(filter)
        if not query or not everything:
            return []
        n = len(everything)
        avgdl = sum(sum(r.terms.values()) for r in everything) / n or 1.0
        df = {t: sum(1 for r in everything if t in r.terms) for t in query}
        idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in query}
        scored = []
        for r in rows:
            dl = sum(r.terms.values())
            score = 0.0
            for t, qtf in query.items():
                tf = r.terms.get(t, 0)
                if tf:
                    score += qtf * idf[t] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / avgdl))
            if score > 0:
                scored.append((score, r))
        return self._best(scored, k)


# --- the filter subset ---------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<meta>metadata\["(?:[^"\\]|\\.)*"\])
      | (?P<op>==|!=|<=|>=|<|>|&&|\|\||\(|\)|\[|\]|,)
      | (?P<word>[A-Za-z_]\w*)
    )""",
    re.VERBOSE,
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_FIELDS = ("id", "doc_id", "chunk", "title", "text")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
Match = Callable[[_Row], bool]


def _unquote(lit: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), lit[1:-1])


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if not expr[pos:].strip():
            break
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise InvalidFilter(f"invalid filter expression at {expr[pos : pos + 20]!r}", expr)
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def compile_filter(expr: str) -> Match:
    """A predicate over rows for a Milvus boolean expression of the supported subset."""
    if not expr.strip():
        return lambda _r: True
    toks = _tokens(expr)
    pos = 0

    def bad(why: str) -> InvalidFilter:
        return InvalidFilter(f"invalid filter expression: {why}", expr)

    def peek() -> tuple[str, str] | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(toks):
            raise bad("unexpected end")
        pos += 1
        return toks[pos - 1]

    def value() -> Any:
        kind, text = take()
        if kind == "str":
            return _unquote(text)
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "word" and text in ("true", "false"):
            return text == "true"
        raise bad(f"expected a literal, got {text!r}")

    def getter() -> Callable[[_Row], Any]:
        kind, text = take()
        if kind == "meta":
            key = _unquote(text[len("metadata[") : -1])
            return lambda r: r.passage.metadata.get(key)
        if kind == "word" and text in _FIELDS:
            return lambda r: r.field(text)
        raise bad(f"unknown field {text!r}")

    def atom() -> Match:
        tok = peek()
        if tok == ("op", "("):
            take()
            inner = disjunction()
            if take() != ("op", ")"):
                raise bad("missing )")
            return inner
        if tok is not None and tok[0] == "word" and tok[1] in ("not", "NOT"):
            take()
            inner = atom()
            return lambda r: not inner(r)
        get = getter()
        kind, text = take()
        negate = kind == "word" and text in ("not", "NOT")
        if negate:
            kind, text = take()
        if kind == "word" and text in ("in", "IN"):
            if take() != ("op", "["):
                raise bad("expected [ after in")
            values = []
            while peek() != ("op", "]"):
                values.append(value())
                if peek() == ("op", ","):
                    take()
            take()
            members = set(values)
            return lambda r: (get(r) in members) != negate
        if negate or kind != "op" or text not in _COMPARE:
            raise bad(f"expected a comparison, got {text!r}")
        compare, lit = _COMPARE[text], value()

        def match(r: _Row) -> bool:
            have = get(r)
            try:
                return have is not None and compare(have, lit)
            except TypeError:
                return False

        return match

    def conjunction() -> Match:
        parts = [atom()]
        while peek() in (("word", "and"), ("word", "AND"), ("op", "&&")):
            take()
            parts.append(atom())
        return parts[0] if len(parts) == 1 else lambda r: all(p(r) for p in parts)

    def disjunction() -> Match:
        parts = [conjunction()]
        while peek() in (("word", "or"), ("word", "OR"), ("op", "||")):
            take()
            parts.append(conjunction())
        return parts[0] if len(parts) == 1 else lambda r: any(p(r) for p in parts)

    match = disjunction()
    if pos != len(toks):
        raise bad(f"unexpected {toks[pos][1]!r}")
    return match
