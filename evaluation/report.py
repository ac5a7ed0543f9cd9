"""Measures and reports: ranx metrics of the service's rankings, tables, markdown and run files."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.table import Table

Mode = Literal["dense", "hybrid", "bm25", "rerank"]
MODES: tuple[Mode, ...] = ("dense", "hybrid", "bm25", "rerank")
METRICS: list[str] = ["ndcg@10", "recall@10", "recall@100", "mrr@10"]
METRIC_LABELS = {
    "ndcg@10": "nDCG@10",
    "recall@10": "R@10",
    "recall@100": "R@100",
    "mrr@10": "MRR@10",
}
TREC_SUFFIXES = {".trec", ".txt", ".run", ".tsv"}


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
    fusion: str | None = None  # how hybrid recall fused (WINNOW_FUSION), when a mode used it

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
            + (f", hybrid fusion `{self.fusion}`" if self.fusion else "")
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
            "fusion": self.fusion,
            "queries": self.queries,
            "metrics": {r.label: r.metrics for r in self.results},
            "runs": {
                r.label: {qid: dict(ranking) for qid, ranking in r.runs.items()}
                for r in self.results
            },
        }
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path


def _ranx_run(runs: dict[str, Ranking]) -> dict[str, dict[str, float]]:
    """ranx orders a run by score, so each document gets a rank-derived score (n − rank): ties in
    the service's scores cannot reorder what is judged."""
    return {
        qid: {doc: float(len(ranking) - i) for i, (doc, _) in enumerate(ranking)}
        for qid, ranking in runs.items()
        if ranking
    }


def measure(
    qrels: dict[str, dict[str, int]], runs: dict[str, Ranking], name: str
) -> dict[str, float]:
    """ranx measures of exactly the rankings given (queries without results count as zeros)."""
    from ranx import Qrels, Run, evaluate

    run = _ranx_run(runs)
    if not run:
        return dict.fromkeys(METRICS, 0.0)
    scores = evaluate(Qrels(qrels), Run(run, name=name), METRICS, make_comparable=True)
    return {m: float(scores[m]) for m in METRICS}


def measure_per_query(
    qrels: dict[str, dict[str, int]], runs: dict[str, Ranking], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, float]]:
    """``{metric: {query id: value}}`` for every judged query, from ranx as :func:`measure`.

    The mean of a subset is that subset's measure: what cross-validation over query folds needs
    without calling ranx once per fold.
    """
    from ranx import Qrels, Run, evaluate

    run = _ranx_run(runs)
    if not run:
        return {m: dict.fromkeys(qrels, 0.0) for m in metrics}
    scores = evaluate(
        Qrels(qrels), Run(run), list(metrics), return_mean=False, make_comparable=True
    )
    order = sorted(qrels)  # ranx returns per-query values in sorted query-id order
    return {m: dict(zip(order, map(float, scores[m]), strict=True)) for m in metrics}


def render(report: EvalReport, width: int = 120) -> str:
    """The rich table as plain text (for logs and tests)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO())
    console.print(report.table())
    return console.file.getvalue()  # type: ignore[attr-defined]
