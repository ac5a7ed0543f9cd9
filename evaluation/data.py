"""BEIR-format datasets: queries, qrels and where the corpus is (streamed later by the ingest job).

Layout::

    DATASET_DIR/corpus.jsonl        {"_id", "title", "text", ...} one per line
    DATASET_DIR/queries.jsonl       {"_id", "text", ...} one per line
    DATASET_DIR/qrels/<split>.tsv   header "query-id<TAB>corpus-id<TAB>score", then one judgement a line
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("test", "train", "dev")
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset directory is not valid BEIR layout; the message names the file (and line)."""


@dataclass(slots=True)
class Dataset:
    """Queries that have judgements for one split, with those judgements (relevance > 0 only)."""

    name: str
    root: Path
    split: str
    corpus: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    unknown_queries: list[str] = field(default_factory=list)  # judged but absent from queries.jsonl


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    return path


def read_queries(path: Path) -> dict[str, str]:
    """``queries.jsonl`` → {query id: text}; a bad line is an error naming ``file:line``."""
    queries: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{n}: expected a JSON object")
            qid, text = record.get("_id", record.get("id")), record.get("text")
            if qid is None or isinstance(qid, dict | list) or str(qid) == "":
                raise DatasetError(f"{path}:{n}: missing '_id'")
            if not isinstance(text, str):
                raise DatasetError(f"{path}:{n}: missing or non-string 'text'")
            queries[str(qid)] = text
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``qrels/<split>.tsv`` → {query id: {doc id: relevance}} (BEIR 3 columns, or TREC 4 columns).

    Judgements with relevance ≤ 0 are dropped: they mark documents as not relevant, which is the default.
    """
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) == 1:
                parts = line.split()
            if n == 1 and parts[:2] == ["query-id", "corpus-id"]:
                continue  # the BEIR header
            if len(parts) == 4:  # TREC: qid iteration docid rel
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
                raise DatasetError(
                    f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {line.strip()!r}"
                )
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise DatasetError(
                    f"{path}:{n}: score {parts[2].strip()!r} is not a number"
                ) from None
            if score > 0:
                qrels.setdefault(parts[0].strip(), {})[parts[1].strip()] = score
    return qrels


def load_dataset(root: str | Path, split: str = "test", max_queries: int | None = None) -> Dataset:
    """Check the layout and read queries and qrels; the corpus is streamed later by the ingest job."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no such dataset directory: {root}")
    corpus = _require(root / "corpus.jsonl")
    qpath = _require(root / "queries.jsonl")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        hint = f" (splits here: {', '.join(have)})" if have else ""
        raise DatasetError(f"missing file: {qrels_path}{hint}")
    queries = read_queries(qpath)
    qrels = read_qrels(qrels_path)
    unknown = [q for q in qrels if q not in queries]
    if unknown:
        log.warning("%d judged queries are not in %s; skipped", len(unknown), qpath)
    judged = [q for q in qrels if q in queries]
    if max_queries is not None:
        judged = judged[:max_queries]
    if not judged:
        raise DatasetError(f"{qrels_path}: no judged query is in {qpath}")
    return Dataset(
        name=root.resolve().name,
        root=root,
        split=split,
        corpus=corpus,
        queries={q: queries[q] for q in judged},
        qrels={q: qrels[q] for q in judged},
        unknown_queries=unknown,
    )


def default_collection(dataset_dir: str | Path, embed_model: str) -> str:
    """``eval_<dataset>_<hash8>``: one collection per dataset and embedding model, reused by reruns."""
    slug = re.sub(r"[^a-z0-9]+", "_", Path(dataset_dir).resolve().name.lower()).strip("_") or "data"
    digest = hashlib.sha1(embed_model.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"eval_{slug[:64]}_{digest}"
