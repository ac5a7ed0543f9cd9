"""``python -m ingest PATH…``: put a corpus into Milvus (Lite file by default)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pipeline.config import Settings, SettingsError, add_settings_arguments, settings_or_exit
from pipeline.logs import setup_logging
from pipeline.store import StoreError

from .job import IngestJob, summary_table
from .ray_engine import RayMissing
from .sources import SUPPORTED, FieldMap

INGEST_SETTINGS = [
    "milvus_uri",
    "milvus_token",
    "milvus_timeout",
    "collection",
    "analyzer",
    "hnsw_m",
    "hnsw_ef_construction",
    "embed_model",
    "embed_device",
    "embed_batch_size",
    "ingest_batch_size",
    "chunk_tokens",
    "chunk_overlap",
    "ingest_engine",
    "ray_address",
    "ray_actors",
    "ray_gpus_per_actor",
    "write_api_key",
    "log_level",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Read documents, split them into passages, embed and upsert them into Milvus. "
        f"Reads folders (recursively) and files of types {', '.join(sorted(SUPPORTED))}. "
        "Idempotent and resumable: rerun it at will.",
    )
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--batch-size", type=int, help="passages per embed+upsert step")
    p.add_argument(
        "--engine",
        choices=["single", "ray"],
        help="single = this process (default); ray = Ray Data embedder actors (winnow[ray])",
    )
    p.add_argument("--actors", type=int, help="Ray engine: embedder actors (WINNOW_RAY_ACTORS)")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        help="Ray engine: GPUs per actor (WINNOW_RAY_GPUS_PER_ACTOR)",
    )
    p.add_argument(
        "--server",
        metavar="URL",
        help="send the documents through a running service's write API (e.g. "
        "http://127.0.0.1:8000) instead of writing to Milvus: the way to add to a Milvus Lite file "
        "the service holds. Key: --write-api-key / WINNOW_WRITE_API_KEY (else WINNOW_API_KEY)",
    )
    p.add_argument(
        "--server-timeout",
        type=float,
        default=300.0,
        help="--server: seconds per request (default 300)",
    )
    p.add_argument("--id-field", help="record field holding the document id (default: _id/id/…)")
    p.add_argument("--text-field", help="record field holding the text (default: text/content/…)")
    p.add_argument("--title-field", help="record field holding the title (default: title/…)")
    p.add_argument("--drop", action="store_true", help="drop the collection first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_settings_arguments(p, only=INGEST_SETTINGS)
    return p


def make_job(settings: Settings) -> IngestJob:
    """The engine the settings ask for (Ray is imported only for ``ray``)."""
    if settings.ingest_engine == "ray":
        from .ray_engine import RayIngestJob

        return RayIngestJob(settings)
    return IngestJob(settings)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    settings = settings_or_exit(
        p,
        args,
        ingest_batch_size=args.batch_size,
        ingest_engine=args.engine,
        ray_actors=args.actors,
        ray_gpus_per_actor=args.gpus_per_actor,
    )
    setup_logging(settings.log_level if not args.quiet else "WARNING")
    settings.log_non_default()
    try:
        return run(args, settings)
    except RayMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a combination only the embedder's limit shows
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:  # Milvus down, a Lite file held by the service, another model's data
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_remote(args: argparse.Namespace, settings: Settings) -> int:
    """``--server``: the same job through the service's write API (chunked and planned there)."""
    from .remote import RemoteError, RemoteIngest

    if args.drop or settings.ingest_engine == "ray":
        print("error: --server cannot be combined with --drop or --engine ray", file=sys.stderr)
        return 2
    secret = settings.write_api_key or settings.api_key
    job = RemoteIngest(
        args.server,
        secret.get_secret_value() if secret is not None else None,
        timeout=args.server_timeout,
    )
    try:
        stats = job.run(
            args.paths,
            fields=FieldMap(id=args.id_field, text=args.text_field, title=args.title_field),
            progress=not args.quiet and sys.stderr.isatty(),
        )
        stored = job.documents_stored() if not args.quiet else None
    except RemoteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        job.close()
    return report(args, stats, None, stored)


def report(
    args: argparse.Namespace, stats: Any, count: int | None, documents: int | None = None
) -> int:
    if not args.quiet:
        print(summary_table(stats, count, documents), end="")
    for problem in stats.problems[:20]:
        print(f"skipped: {problem}", file=sys.stderr)
    if len(stats.problems) > 20:
        print(f"… and {len(stats.problems) - 20} more problems", file=sys.stderr)
    if not stats.ok:
        print("error: nothing could be ingested", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.server:
        return run_remote(args, settings)
    job = make_job(settings)
    if args.drop and job.store.exists():
        job.store.drop()
    stats = job.run(
        args.paths,
        fields=FieldMap(id=args.id_field, text=args.text_field, title=args.title_field),
        progress=not args.quiet and sys.stderr.isatty(),
    )
    count = job.store.count() if not args.quiet else None
    job.store.close()
    return report(args, stats, count)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
