"""Run an evaluation: sync the corpus into its own collection, query every judged query per mode.

Why it goes through ``SearchService``: the figures must describe what the API returns (same recall, same
reranker, same max-passage folding of passages into documents), not a parallel re-implementation. The
services come from the composition root (:class:`pipeline.runtime.Runtime`), so the collection/model rule
is the API's, with the API's message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.data import default_collection, load_dataset
from evaluation.report import MODES, EvalReport, ModeResult, Ranking, measure
from pipeline.config import Settings

if TYPE_CHECKING:
    from pipeline.embedding import Embedder
    from pipeline.rerank.base import Reranker
    from pipeline.runtime import Runtime
    from pipeline.search import RecallMode

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot run as asked (e.g. rerank mode without a usable reranker)."""


def _check_args(modes: Sequence[str], rerank_recall: str, top_k: int) -> None:
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EvalError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if rerank_recall not in ("dense", "hybrid", "bm25"):
        raise EvalError(f"rerank recall must be dense, hybrid or bm25, not {rerank_recall!r}")
    if top_k < 1:
        raise EvalError("top_k must be ≥ 1")


def _load(runtime: Runtime, modes: Sequence[str]) -> None:
    """Load the models before any ingest work, so an unusable rerank mode fails at once."""
    from pipeline.model_files import ModelUnavailable

    wants_rerank = "rerank" in modes
    if wants_rerank and runtime.reranker is None and not runtime.settings.rerank:
        raise EvalError(
            "rerank mode needs reranking on (WINNOW_RERANK=on / --rerank); "
            "drop 'rerank' from --modes to evaluate recall only"
        )
    try:
        runtime.load(reranker=wants_rerank)
    except ModelUnavailable as exc:
        raise EvalError(f"rerank mode: {exc}" if wants_rerank else str(exc)) from exc


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
    from pipeline.runtime import CollectionMissing, Runtime

    _check_args(modes, rerank_recall, top_k)
    data = load_dataset(dataset_dir, split, max_queries)
    name = (
        collection
        if collection is not None
        else default_collection(data.root, settings.embed_model)
    )
    # a batch job waits for its work: no up-front deadline refusal (WINNOW_RERANK_DEADLINE_S is for
    # interactive requests)
    settings = settings.model_copy(update={"rerank_deadline_s": 0})
    runtime = Runtime(settings, collection=name, embedder=embedder, reranker=reranker)
    ingest_seconds, embedded, skipped = 0.0, 0, 0
    try:
        _load(runtime, modes)
        if ingest:
            from ingest.job import IngestJob

            stats = IngestJob(settings, embedder=runtime.embedder, store=runtime.store).run(
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
        try:
            runtime.check_collection()
        except CollectionMissing as exc:
            raise EvalError(f"{exc}; or run without --skip-ingest") from exc
        results = asyncio.run(
            _run_modes(runtime, data.queries, data.qrels, modes, top_k, rerank_recall, progress)
        )
    finally:
        runtime.store.close()
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
        fusion=settings.fusion_label if any(m in ("hybrid", "rerank") for m in modes) else None,
    )


async def _run_modes(
    runtime: Runtime,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    modes: Sequence[str],
    top_k: int,
    rerank_recall: RecallMode,
    progress: bool,
) -> list[ModeResult]:
    from tqdm import tqdm

    out: list[ModeResult] = []
    try:
        for mode in modes:
            recall: RecallMode = rerank_recall if mode == "rerank" else mode  # type: ignore[assignment]
            runs: dict[str, Ranking] = {}
            bar = tqdm(
                queries.items(),
                desc=f"eval {mode}",
                unit=" q",
                disable=not progress,
                dynamic_ncols=True,
            )
            t0 = time.perf_counter()
            for qid, text in bar:
                res = await runtime.service.search(  # every candidate reranked, or 413
                    text,
                    top_k=top_k,
                    top_n=top_k,
                    mode=recall,
                    rerank=mode == "rerank",
                    partial=False,
                )
                runs[qid] = [(r.doc_id, r.score) for r in res.results]
            seconds = time.perf_counter() - t0
            bar.close()
            out.append(
                ModeResult(
                    mode=mode,  # type: ignore[arg-type]
                    metrics=measure(qrels, runs, mode),
                    queries=len(runs),
                    seconds=seconds,
                    runs=runs,
                    recall_mode=recall,
                )
            )
    finally:
        if runtime.reranker is not None:
            await runtime.aclose()  # the reranker's queue lives on this loop; store closed after
    return out
