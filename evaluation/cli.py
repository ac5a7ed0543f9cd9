"""``python -m pipeline eval`` / ``python -m evaluation``: flags and the command.

Imported by ``pipeline/__main__.py`` to build its parser, so this module imports nothing heavy (and not
``ingest``) at import time. It never imports the CLI back: ``python -m evaluation`` builds its own
parser here (:func:`main`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.data import SPLITS
from evaluation.report import MODES
from pipeline.config import Settings, add_settings_arguments, settings_or_exit
from pipeline.logs import setup_logging


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
    """``python -m pipeline eval`` (or ``python -m evaluation``): 0 = done, 2 = bad dataset or an evaluation that cannot run."""
    from rich.console import Console
    from rich.markup import escape

    from evaluation.data import DatasetError
    from evaluation.run import EvalError, evaluate
    from pipeline.model_files import ModelUnavailable
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
        f"eval {sum(r.seconds for r in report.results):.1f} s · collection {report.collection}"
        + (f" · hybrid fusion {report.fusion}" if report.fusion else ""),
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


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation DATASET_DIR …``: the eval subcommand's flags and settings, on its own."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="BEIR-format evaluation: nDCG, Recall, MRR per mode",
    )
    add_eval_arguments(p)
    add_settings_arguments(p)
    args = p.parse_args(argv)
    settings = settings_or_exit(p, args)
    setup_logging(settings.log_level)
    return run_eval_cli(args, settings)
