"""Ingest benchmark: the full job vs bare ``SentenceTransformer.encode`` of the same passages.

1. ``IngestJob`` on a fresh Milvus Lite file (read → chunk → embed → upsert → flush), timed end to end
   (model load excluded: the embedder is loaded before the clock starts);
2. the same job again (nothing changed: every document is skipped without embedding);
3. bare ``model.encode`` over exactly the passages the job embedded (same texts, same batch size).

    python bench/ingest.py ../shared/data/scifact/corpus.jsonl --json /tmp/ingest.json
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
    args = ap.parse_args(argv)

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

    chunker = chunker_for(embedder, settings)
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


if __name__ == "__main__":
    sys.exit(main())
