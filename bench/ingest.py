"""Ingest benchmark: the full job vs bare ``SentenceTransformer.encode``, and the Ray engine vs the job.

``--engine single`` (default):
1. ``IngestJob`` on a fresh Milvus Lite file (read → chunk → embed → upsert → flush), timed end to end
   (model load excluded: the embedder is loaded before the clock starts);
2. the same job again (nothing changed: every document is skipped without embedding);
3. bare ``model.encode`` over exactly the passages the job embedded (same texts, same batch size).

``--engine ray``: the single-process job and the Ray engine on the same documents, each into a fresh
collection, with the per-stage time split (read/chunk/plan in the driver, embed, write). The Ray
wall time counts everything a user waits for: starting the local Ray, starting the actor pool and
loading a model in every actor. Embed and write seconds are summed over actors.

    python bench/ingest.py ../shared/data/scifact/corpus.jsonl --json /tmp/ingest.json
    python bench/ingest.py ../shared/data/scifact/corpus.jsonl --engine ray --limit 1000 [--actors 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("corpus", nargs="+")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--engine", choices=["single", "ray"], default="single")
    ap.add_argument("--limit", type=int, help="only the first N lines of each .jsonl corpus")
    ap.add_argument("--actors", type=int, default=1, help="Ray engine: embedder actors")
    ap.add_argument(
        "--milvus-uri", help="a Milvus server for both runs (default: fresh Lite files)"
    )
    args = ap.parse_args(argv)
    if args.limit is not None:
        args.corpus = [limited(Path(c), args.limit) for c in args.corpus]
    if args.engine == "ray":
        return compare_ray(args)

    from ingest.job import IngestJob, chunker_for
    from ingest.sources import Document, read_corpus
    from pipeline.config import Settings
    from pipeline.embedding import Embedder
    from pipeline.logs import setup_logging

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="winnow-bench-ingest-"))
    settings = Settings(milvus_uri=str(tmp / "bench.db"))
    embedder = Embedder(settings.embed_model, device=settings.embed_device).load()
    out: dict[str, object] = {"corpus": args.corpus, "embed_model": settings.embed_model}

    t0 = time.perf_counter()
    stats = IngestJob(settings, embedder=embedder).run(args.corpus, progress=False)
    out["ingest_s"] = round(time.perf_counter() - t0, 2)
    out["documents"], out["passages"] = stats.documents, stats.passages
    out["ingest_passages_per_s"] = round(stats.embedded / out["ingest_s"], 1)

    t0 = time.perf_counter()
    again = IngestJob(settings, embedder=embedder).run(args.corpus, progress=False)
    out["rerun_s"] = round(time.perf_counter() - t0, 2)
    out["rerun_embedded"] = again.embedded

    chunker = chunker_for(embedder, settings.ingest)
    texts = [
        p.search_text
        for _, item in read_corpus(args.corpus)
        if isinstance(item, Document)
        for p in chunker.split(item)
    ]
    t0 = time.perf_counter()
    embedder.encoder.encode(
        texts,
        batch_size=settings.embed_batch_size,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    out["bare_encode_s"] = round(time.perf_counter() - t0, 2)
    out["bare_passages_per_s"] = round(len(texts) / out["bare_encode_s"], 1)
    out["ratio_ingest_vs_bare"] = round(out["ingest_s"] / out["bare_encode_s"], 3)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def limited(path: Path, n: int) -> str:
    if path.suffix != ".jsonl":
        return str(path)
    out = Path(tempfile.mkdtemp(prefix="winnow-bench-corpus-")) / path.name
    with path.open() as src, out.open("w") as dst:
        for i, line in enumerate(src):
            if i >= n:
                break
            dst.write(line)
    return str(out)


def stage_split(stats: object) -> dict[str, float]:
    return {
        "read_chunk_plan_s": round(stats.read_s, 2),
        "embed_s": round(stats.embed_s, 2),
        "write_s": round(stats.write_s, 2),
    }


def compare_ray(args: argparse.Namespace) -> int:
    import os

    from ingest.job import IngestJob
    from ingest.ray_engine import RayIngestJob, start_ray
    from pipeline.config import Settings
    from pipeline.embedding import Embedder
    from pipeline.logs import setup_logging

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="winnow-bench-ray-"))
    tag = os.getpid()

    def settings(name: str, **kw: object) -> Settings:
        if args.milvus_uri:
            return Settings(milvus_uri=args.milvus_uri, collection=f"bench_{name}_{tag}", **kw)
        return Settings(milvus_uri=str(tmp / f"{name}.db"), **kw)

    s1 = settings("single")
    embedder = Embedder(s1.embed_model, device=s1.embed_device).load()
    load = os.getloadavg()
    out: dict[str, object] = {
        "corpus": args.corpus,
        "embed_model": s1.embed_model,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load],
    }

    t0 = time.perf_counter()
    single = IngestJob(s1, embedder=embedder).run(args.corpus, progress=False)
    single_s = time.perf_counter() - t0
    out["documents"], out["passages"] = single.documents, single.passages
    out["single"] = {
        "wall_s": round(single_s, 2),
        "passages_per_s": round(single.embedded / single_s, 1),
        **stage_split(single),
    }

    s2 = settings("ray", ingest_engine="ray", ray_actors=args.actors)
    t0 = time.perf_counter()
    start_ray(s2)
    init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ray_stats = RayIngestJob(s2, embedder=embedder).run(args.corpus, progress=False)
    job_s = time.perf_counter() - t1
    ray_s = init_s + job_s
    assert ray_stats.embedded == single.embedded, (ray_stats.embedded, single.embedded)
    out["ray"] = {
        "actors": args.actors,
        "wall_s": round(ray_s, 2),
        "ray_init_s": round(init_s, 2),
        "job_s": round(job_s, 2),
        "passages_per_s": round(ray_stats.embedded / ray_s, 1),
        **stage_split(ray_stats),
    }
    out["ratio_ray_vs_single"] = round(ray_s / single_s, 3)
    # what one more actor adds, from the split: an actor embeds at passages / embed-seconds;
    # the driver (read/chunk/plan, plus Lite writes) caps the whole job at passages / its seconds
    out["per_actor_embed_passages_per_s"] = round(ray_stats.embedded / ray_stats.embed_s, 1)
    out["driver_cap_passages_per_s"] = round(ray_stats.embedded / max(ray_stats.read_s, 1e-9), 1)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
