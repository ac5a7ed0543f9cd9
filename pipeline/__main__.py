"""``python -m pipeline serve|search|eval``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from pipeline.config import Settings, add_settings_arguments, settings_or_exit
from pipeline.logs import setup_logging
from pipeline.model_files import ModelUnavailable

log = logging.getLogger("winnow")


def _device_summary(settings: Settings) -> str:
    from pipeline.devices import cuda_available
    from pipeline.runtime import rerank_backend

    backend = rerank_backend(settings)
    device = "cuda" if cuda_available() else "cpu"
    return f"device={device} rerank_backend={backend}"


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.api.server import serve
    from pipeline.runtime import Runtime
    from pipeline.store import StoreInUse

    settings.log_non_default()
    log.info("%s", _device_summary(settings))
    if settings.workers > 1 and settings.is_milvus_lite:
        log.error(
            "Milvus Lite (%s) is one process per file: use --workers 1, or a Milvus server URI",
            settings.milvus_uri,
        )
        return 2
    if settings.workers > 1:
        # workers are fresh processes: hand them every override, secrets included, by environment
        os.environ.update(settings.to_env())
        serve(settings)
        return 0
    runtime = Runtime(settings)
    try:
        if settings.is_milvus_lite:
            runtime.store.open()  # a Lite file held by another process: say so now, in one line
        runtime.load()  # fail here, in one line, rather than inside the server's lifespan
    except StoreInUse as exc:
        log.error("%s", exc)
        return 2
    except ModelUnavailable as exc:
        log.error(
            "cannot serve with reranking: %s. Set WINNOW_RERANK=off to serve recall-only.", exc
        )
        return 2
    from pipeline.api import create_app

    serve(settings, create_app(settings, runtime=runtime))
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.markup import escape

    from pipeline.runtime import CollectionMissing, Runtime
    from pipeline.store import StoreError

    console = Console(stderr=True)
    # one query from a terminal: the user waits for it, so no up-front deadline refusal
    runtime = Runtime(settings.model_copy(update={"rerank_deadline_s": 0}))
    try:
        runtime.load()
    except ModelUnavailable as exc:
        if not settings.rerank:
            raise
        console.print(
            f"[bold red]!! reranker unavailable:[/] {escape(str(exc))}\n"
            "[bold red]!! showing recall-only results[/] (set WINNOW_RERANK_MODEL to a local "
            "Qwen3-Reranker directory, or WINNOW_RERANK=off to silence this)"
        )
        runtime.load(reranker=False)

    async def run() -> Any:
        try:
            return await runtime.service.search(
                args.query, instruction=args.instruction, filter=args.filter
            )
        finally:
            await runtime.aclose()

    try:
        runtime.check_collection()
        res = asyncio.run(run())
    except (CollectionMissing, StoreError) as exc:
        console.print(f"error: {escape(str(exc))}", highlight=False, soft_wrap=True, style="red")
        asyncio.run(runtime.aclose())
        return 1
    print_results(args.query, res)
    return 0


def print_results(query: str, res: Any) -> None:
    """The ranked table and the stage timings, on stdout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipeline.errors import excerpt

    table = Table(title=f"{query!r} — {res.mode} recall{' + rerank' if res.reranked else ''}")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("doc_id")
    table.add_column("title / text", overflow="fold")
    for i, r in enumerate(res.results, 1):
        # one flowing line: a source file's own line breaks would break the cell at random words
        snippet = escape(excerpt(r.text, 160))
        head = f"[bold]{escape(r.title)}[/]\n" if r.title else ""
        table.add_row(str(i), f"{r.score:.4f}", f"{r.recall_score:.4f}", r.doc_id, head + snippet)
    out = Console()
    out.print(table)
    t = res.timings_ms
    out.print(
        f"embed {t['embed']:.1f} ms · recall {t['recall']:.1f} ms · "
        f"rerank {t['rerank']:.1f} ms · total {t['total']:.1f} ms"
    )


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    # the evaluator lives outside the query package (it ingests the corpus through ``ingest``)
    from evaluation.cli import run_eval_cli

    return run_eval_cli(args, settings)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Winnow query service")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (FastAPI/uvicorn)")
    add_settings_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    search = sub.add_parser("search", help="one query from the terminal, as a ranked table")
    search.add_argument("query")
    search.add_argument("--instruction", help="reranker instruction for this query")
    search.add_argument("--filter", default="", help="Milvus filter expression")
    add_settings_arguments(search)
    search.set_defaults(func=cmd_search)

    from evaluation.cli import add_eval_arguments  # light: the evaluator's flags only

    ev = sub.add_parser("eval", help="BEIR-format evaluation: nDCG, Recall, MRR per mode")
    add_eval_arguments(ev)
    add_settings_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    settings = settings_or_exit(p, args)
    setup_logging(settings.log_level)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
