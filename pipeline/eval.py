"""BEIR-format evaluation: nDCG@10, Recall@10/@100 and MRR@10 per retrieval mode.

Why it goes through ``SearchService``: the figures must describe what the API returns (same recall, same
reranker, same max-passage folding of passages into documents), not a parallel re-implementation.
Measures come from ``ranx``; nothing here computes a metric by hand.

Dataset layout (BEIR)::

    DATASET_DIR/corpus.jsonl        {"_id", "title", "text", ...} one per line
    DATASET_DIR/queries.jsonl       {"_id", "text", ...} one per line
    DATASET_DIR/qrels/<split>.tsv   header "query-id<TAB>corpus-id<TAB>score", then one judgement a line

The corpus goes into its own collection (``eval_<dataset>_<hash8 of the embed model>`` unless told
otherwise) through the ordinary ``IngestJob``, so a rerun skips unchanged documents without embedding.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.config import Settings

if TYPE_CHECKING:
    from rich.table import Table

    from pipeline.embedding import Embedder
    from pipeline.rerank import Reranker
    from pipeline.search import RecallMode

log = logging.getLogger(__name__)

Mode = Literal["dense", "hybrid", "bm25", "rerank"]
MODES: tuple[Mode, ...] = ("dense", "hybrid", "bm25", "rerank")
METRICS: list[str] = ["ndcg@10", "recall@10", "recall@100", "mrr@10"]
METRIC_LABELS = {
    "ndcg@10": "nDCG@10",
    "recall@10": "R@10",
    "recall@100": "R@100",
    "mrr@10": "MRR@10",
}
SPLITS = ("test", "train", "dev")
TREC_SUFFIXES = {".trec", ".txt", ".run", ".tsv"}


class DatasetError(ValueError):
    """The dataset directory is not valid BEIR layout; the message names the file (and line)."""


class EvalError(RuntimeError):
    """The evaluation cannot run as asked (e.g. rerank mode without a usable reranker)."""


# --- dataset ------------------------------------------------------------------------------------


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


# --- results --------------------------------------------------------------------------------------

Ranking = list[tuple[str, float]]  # (doc id, service score), best first


@dataclass(slots=True)
class ModeResult:
    """One mode's measures, its timing and the judged rankings."""

    mode: Mode
    metrics: dict[str, float]
    queries: int
    seconds: float
    runs: dict[str, Ranking]
    recall_mode: str  # what recalled the candidates ("hybrid" for rerank over hybrid recall)

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else 0.0

    @property
    def label(self) -> str:
        return f"rerank ({self.recall_mode})" if self.mode == "rerank" else self.mode


@dataclass(slots=True)
class EvalReport:
    dataset: str
    split: str
    collection: str
    top_k: int
    embed_model: str
    results: list[ModeResult]
    queries: int
    ingest_seconds: float = 0.0
    ingest_embedded: int = 0
    ingest_skipped: int = 0
    rerank_model: str | None = None
    unknown_queries: int = 0

    def result(self, mode: str) -> ModeResult:
        for r in self.results:
            if r.mode == mode:
                return r
        raise KeyError(mode)

    def rows(self) -> list[list[str]]:
        return [
            [
                r.label,
                *(f"{r.metrics[m]:.4f}" for m in METRICS),
                str(r.queries),
                f"{r.queries_per_s:.1f}",
                f"{r.seconds:.1f}",
            ]
            for r in self.results
        ]

    @property
    def headers(self) -> list[str]:
        return ["mode", *(METRIC_LABELS[m] for m in METRICS), "queries", "queries/s", "seconds"]

    def table(self) -> Table:
        from rich.table import Table

        t = Table(
            title=f"{self.dataset} ({self.split}, {self.queries} queries, top_k {self.top_k})"
        )
        for i, h in enumerate(self.headers):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in self.rows():
            t.add_row(*row)
        return t

    def markdown(self) -> str:
        lines = [
            f"Dataset `{self.dataset}`, split `{self.split}`, {self.queries} queries, "
            f"top_k {self.top_k} (the whole ranking is judged), embed model `{self.embed_model}`"
            + (f", rerank model `{self.rerank_model}`" if self.rerank_model else "")
            + f", collection `{self.collection}`.",
            "",
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def save_runs(self, path: str | Path) -> Path:
        """JSON (default) or TREC run file (``.trec``/``.txt``/``.run``/``.tsv``), see docs/evaluation.md."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in TREC_SUFFIXES:
            with path.open("w", encoding="utf-8") as f:
                for r in self.results:
                    tag = r.label.replace(" ", "").replace("(", "_").replace(")", "")
                    for qid, ranking in r.runs.items():
                        for rank, (doc, score) in enumerate(ranking, 1):
                            f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
            return path
        payload = {
            "dataset": self.dataset,
            "split": self.split,
            "collection": self.collection,
            "top_k": self.top_k,
            "embed_model": self.embed_model,
            "rerank_model": self.rerank_model,
            "queries": self.queries,
            "metrics": {r.label: r.metrics for r in self.results},
            "runs": {
                r.label: {qid: dict(ranking) for qid, ranking in r.runs.items()}
                for r in self.results
            },
        }
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path


def measure(
    qrels: dict[str, dict[str, int]], runs: dict[str, Ranking], name: str
) -> dict[str, float]:
    """ranx measures of exactly the rankings given.

    ranx orders a run by score, so each document gets a rank-derived score (n − rank): ties in the
    service's scores cannot reorder what is judged. Queries without results count as zeros.
    """
    from ranx import Qrels, Run, evaluate

    run = {
        qid: {doc: float(len(ranking) - i) for i, (doc, _) in enumerate(ranking)}
        for qid, ranking in runs.items()
        if ranking
    }
    if not run:
        return dict.fromkeys(METRICS, 0.0)
    scores = evaluate(Qrels(qrels), Run(run, name=name), METRICS, make_comparable=True)
    return {m: float(scores[m]) for m in METRICS}


# --- evaluation -------------------------------------------------------------------------------------


def _load_reranker(settings: Settings) -> Reranker:
    """Fail before any ingest work when rerank mode cannot run."""
    from pipeline.models import ModelUnavailable, resolve_model
    from pipeline.rerank import build_reranker

    if not settings.rerank:
        raise EvalError(
            "rerank mode needs reranking on (WINNOW_RERANK=on / --rerank); "
            "drop 'rerank' from --modes to evaluate recall only"
        )
    try:
        path = resolve_model(settings.rerank_model, what="reranker", setting="WINNOW_RERANK_MODEL")
    except ModelUnavailable as exc:
        raise EvalError(f"rerank mode: {exc}") from exc
    reranker = build_reranker(settings, model_path=path)
    reranker.load()
    return reranker


def evaluate(
    settings: Settings,
    dataset_dir: str | Path,
    *,
    split: str = "test",
    modes: Sequence[str] = ("dense", "hybrid"),
    top_k: int = 100,
    max_queries: int | None = None,
    embedder: Embedder | None = None,
    reranker: Reranker | None = None,
    progress: bool = True,
    collection: str | None = None,
    rerank_recall: RecallMode = "hybrid",
    ingest: bool = True,
) -> EvalReport:
    """Ingest the corpus when needed, run every judged query of ``split`` per mode, measure with ranx.

    A reranker passed in is used as is (and left open); one built here is closed at the end.
    """
    from tqdm import tqdm

    from pipeline.embedding import Embedder
    from pipeline.search import SearchService
    from pipeline.store import MilvusStore

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EvalError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if rerank_recall not in ("dense", "hybrid", "bm25"):
        raise EvalError(f"rerank recall must be dense, hybrid or bm25, not {rerank_recall!r}")
    if top_k < 1:
        raise EvalError("top_k must be ≥ 1")
    data = load_dataset(dataset_dir, split, max_queries)
    name = (
        collection
        if collection is not None
        else default_collection(data.root, settings.embed_model)
    )

    own_reranker = False
    if "rerank" in modes and reranker is None:
        reranker = _load_reranker(settings)
        own_reranker = True

    emb = embedder if embedder is not None else Embedder.from_settings(settings)
    store = MilvusStore.from_settings(settings, name)
    ingest_seconds, embedded, skipped = 0.0, 0, 0
    try:
        if ingest:
            from ingest.job import (
                IngestJob,
            )  # the one place pipeline reaches into ingest: eval only

            stats = IngestJob(settings, embedder=emb, store=store).run(
                [data.corpus], progress=progress
            )
            ingest_seconds, embedded, skipped = stats.seconds, stats.embedded, stats.skipped
            log.info(
                "ingest %s: %d documents, %d passages embedded, %d unchanged, %.1f s",
                name,
                stats.documents,
                stats.embedded,
                stats.unchanged,
                stats.seconds,
            )
        else:
            emb.load()
        model, _ = store.open()
        if model is None:
            raise EvalError(
                f"collection {name!r} is missing or empty at {settings.milvus_uri}; run without --skip-ingest"
            )
        service = SearchService(settings, emb, store, reranker)

        async def run_all() -> list[ModeResult]:
            out: list[ModeResult] = []
            try:
                for mode in modes:
                    recall: RecallMode = rerank_recall if mode == "rerank" else mode  # type: ignore[assignment]
                    runs: dict[str, Ranking] = {}
                    bar = tqdm(
                        data.queries.items(),
                        desc=f"eval {mode}",
                        unit=" q",
                        disable=not progress,
                        dynamic_ncols=True,
                    )
                    t0 = time.perf_counter()
                    for qid, text in bar:
                        res = await service.search(
                            text, top_k=top_k, top_n=top_k, mode=recall, rerank=mode == "rerank"
                        )
                        runs[qid] = [(r.doc_id, r.score) for r in res.results]
                    seconds = time.perf_counter() - t0
                    bar.close()
                    out.append(
                        ModeResult(
                            mode=mode,  # type: ignore[arg-type]
                            metrics=measure(data.qrels, runs, mode),
                            queries=len(runs),
                            seconds=seconds,
                            runs=runs,
                            recall_mode=recall,
                        )
                    )
            finally:
                if own_reranker and reranker is not None:
                    await reranker.aclose()
            return out

        results = asyncio.run(run_all())
    finally:
        store.close()
    return EvalReport(
        dataset=data.name,
        split=split,
        collection=name,
        top_k=top_k,
        embed_model=settings.embed_model,
        results=results,
        queries=len(data.queries),
        ingest_seconds=ingest_seconds,
        ingest_embedded=embedded,
        ingest_skipped=skipped,
        rerank_model=settings.rerank_model if "rerank" in modes else None,
        unknown_queries=len(data.unknown_queries),
    )


# --- CLI --------------------------------------------------------------------------------------------


def _modes_arg(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}"
        )
    return list(dict.fromkeys(modes))


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return n


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's own flags (settings flags are added by the caller)."""
    parser.add_argument(
        "dataset_dir", help="BEIR-format folder: corpus.jsonl, queries.jsonl, qrels/"
    )
    parser.add_argument(
        "--split", default="test", choices=SPLITS, help="qrels split (default test)"
    )
    parser.add_argument(
        "--modes",
        type=_modes_arg,
        default=["dense", "hybrid"],
        help="comma-separated: dense, hybrid, bm25, rerank (default dense,hybrid)",
    )
    parser.add_argument(
        "--rerank-recall",
        default="hybrid",
        choices=("hybrid", "dense"),
        help="what recalls the candidates of rerank mode (default hybrid)",
    )
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=100,
        help="passages recalled per query; the whole folded ranking is judged (default 100)",
    )
    parser.add_argument("--max-queries", type=_positive_int, help="only the first N judged queries")
    parser.add_argument(
        "--output", help="save the runs: .json (default format) or .trec/.txt/.run (TREC)"
    )
    parser.add_argument("--report", help="write the table as markdown to this file")
    parser.add_argument(
        "--collection", help="collection name (default eval_<dataset>_<hash of embed model>)"
    )
    parser.add_argument(
        "--skip-ingest",
        action="store_true",
        help="use the collection as it is (it must exist) instead of syncing the corpus",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run_eval_cli(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m pipeline eval``: 0 = done, 2 = bad dataset or an evaluation that cannot run."""
    from rich.console import Console
    from rich.markup import escape

    from pipeline.models import ModelUnavailable
    from pipeline.store import StoreError

    err = Console(stderr=True)
    try:
        report = evaluate(
            settings,
            args.dataset_dir,
            split=args.split,
            modes=args.modes,
            top_k=args.top_k,
            max_queries=args.max_queries,
            progress=not args.quiet,
            collection=args.collection,
            rerank_recall=args.rerank_recall,
            ingest=not args.skip_ingest,
        )
    except (DatasetError, EvalError, ModelUnavailable) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except StoreError as exc:  # Milvus unreachable, or the collection holds another model's vectors
        err.print(f"[bold red]store error:[/] {escape(str(exc))}", highlight=False)
        return 1
    out = Console(file=sys.stdout)
    out.print(report.table())
    out.print(
        f"ingest {report.ingest_seconds:.1f} s ({report.ingest_embedded} passages embedded) · "
        f"eval {sum(r.seconds for r in report.results):.1f} s · collection {report.collection}",
        highlight=False,
    )
    if report.ingest_skipped:
        err.print(f"[yellow]{report.ingest_skipped} corpus records skipped (see the log)[/]")
    if report.unknown_queries:
        err.print(f"[yellow]{report.unknown_queries} judged queries not in queries.jsonl[/]")
    if args.output:
        out.print(f"runs → {report.save_runs(args.output)}", highlight=False)
    if args.report:
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.markdown(), encoding="utf-8")
        out.print(f"report → {path}", highlight=False)
    return 0


def render(report: EvalReport, width: int = 120) -> str:
    """The rich table as plain text (for logs and tests)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO())
    console.print(report.table())
    return console.file.getvalue()  # type: ignore[attr-defined]


__all__ = [
    "METRICS",
    "MODES",
    "Dataset",
    "DatasetError",
    "EvalError",
    "EvalReport",
    "ModeResult",
    "add_eval_arguments",
    "default_collection",
    "evaluate",
    "load_dataset",
    "measure",
    "read_qrels",
    "read_queries",
    "run_eval_cli",
]
