"""``python -m pipeline serve|search|eval``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from pipeline.config import Settings, add_settings_arguments, settings_from_args
from pipeline.logs import setup_logging
from pipeline.models import ModelUnavailable

log = logging.getLogger("winnow")


def _device_summary(settings: Settings) -> str:
    from pipeline.rerank import cuda_available, pick_backend

    backend = pick_backend(settings) if settings.rerank else "off"
    device = "cuda" if cuda_available() else "cpu"
    return f"device={device} rerank_backend={backend}"


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from pipeline.api.app import load_reranker

    settings.log_non_default()
    log.info("%s", _device_summary(settings))
    if settings.workers > 1 and settings.is_milvus_lite:
        log.error(
            "Milvus Lite (%s) is one process per file: use --workers 1, or a Milvus server URI",
            settings.milvus_uri,
        )
        return 2
    reranker = None
    if settings.rerank:
        try:
            reranker = load_reranker(settings) if settings.workers == 1 else None
        except ModelUnavailable as exc:
            log.error(
                "cannot serve with reranking: %s. Set WINNOW_RERANK=off to serve recall-only.", exc
            )
            return 2
    if settings.workers > 1:
        # workers are fresh processes: hand them every override, secrets included, by environment
        os.environ.update(settings.to_env())
        uvicorn.run(
            "pipeline.api.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
        )
        return 0
    from pipeline.api import create_app

    app = create_app(settings, reranker=reranker)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.api.app import load_reranker
    from pipeline.embedding import Embedder
    from pipeline.search import SearchService
    from pipeline.store import MilvusStore

    console = Console(stderr=True)
    reranker: Any = None
    if settings.rerank:
        try:
            reranker = load_reranker(settings)
        except ModelUnavailable as exc:
            console.print(
                f"[bold red]!! reranker unavailable:[/] {exc}\n"
                "[bold red]!! showing recall-only results[/] (set WINNOW_RERANK_MODEL to a local "
                "Qwen3-Reranker directory, or WINNOW_RERANK=off to silence this)"
            )
    embedder = Embedder.from_settings(settings).load()
    store = MilvusStore.from_settings(settings)
    model, _ = store.open()
    if model is None:
        console.print(
            f"[red]collection {settings.collection!r} is empty or missing at "
            f"{settings.milvus_uri}: run python -m ingest PATH first[/]"
        )
        return 1
    service = SearchService(settings, embedder, store, reranker)

    async def run() -> Any:
        try:
            return await service.search(
                args.query,
                instruction=args.instruction,
                filter=args.filter,
                rerank=reranker is not None,
            )
        finally:
            if reranker is not None:
                await reranker.aclose()

    res = asyncio.run(run())
    table = Table(title=f"{args.query!r} — {res.mode} recall{' + rerank' if res.reranked else ''}")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("doc_id")
    table.add_column("title / text", overflow="fold")
    for i, r in enumerate(res.results, 1):
        snippet = (r.text[:160] + "…") if len(r.text) > 160 else r.text
        head = f"[bold]{r.title}[/]\n" if r.title else ""
        table.add_row(str(i), f"{r.score:.4f}", f"{r.recall_score:.4f}", r.doc_id, head + snippet)
    out = Console()
    out.print(table)
    t = res.timings_ms
    out.print(
        f"embed {t['embed']:.1f} ms · recall {t['recall']:.1f} ms · "
        f"rerank {t['rerank']:.1f} ms · total {t['total']:.1f} ms"
    )
    store.close()
    return 0


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

    try:
        from pipeline.eval import add_eval_arguments, run_eval_cli
    except ImportError:  # pragma: no cover
        pass
    else:
        ev = sub.add_parser("eval", help="BEIR-format evaluation: nDCG, Recall, MRR per mode")
        add_eval_arguments(ev)
        add_settings_arguments(ev)
        ev.set_defaults(func=run_eval_cli)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
