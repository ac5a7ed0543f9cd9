"""Write API benchmark: documents/s through the API vs the ingest job, and search latency under writes.

One run, one machine, one embedder (MiniLM on CPU unless WINNOW_EMBED_DEVICE says otherwise):

1. ``IngestJob`` into a fresh Milvus Lite file: the first ``--docs`` documents of the corpus;
2. the same documents through a running service's write API, exactly as ``python -m ingest PATH
   --server URL`` sends them (``ingest.remote.RemoteIngest``), into another fresh Lite file;
3. on that service (recall only: no reranker, so the figure is the part writes can disturb, the
   query embed and the Milvus search): ``--queries`` sequential searches idle, then the same
   searches while a writer keeps posting batches of ``--load-batch`` new documents back to back.

    python bench/writes.py ../shared/data/scifact --docs 1000 --queries 200 --json /tmp/writes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_jsonl(path: Path, n: int) -> list[dict]:
    out = []
    with path.open() as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset", type=Path, help="a BEIR folder (corpus.jsonl, queries.jsonl)")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--load-batch", type=int, default=16, help="documents per write under load")
    ap.add_argument("--slice", type=int, default=None, help="WINNOW_WRITE_EMBED_SLICE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import httpx

    from ingest.job import IngestJob
    from ingest.remote import RemoteIngest
    from pipeline.api import create_app
    from pipeline.config import Settings
    from pipeline.embedding import Embedder
    from pipeline.logs import setup_logging
    from testkit.corpus import write_jsonl
    from testkit.servers import LiveServer

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="winnow-bench-writes-"))
    docs = read_jsonl(args.dataset / "corpus.jsonl", args.docs)
    load_docs = read_jsonl(args.dataset / "corpus.jsonl", args.docs + 20_000)[args.docs :]
    queries = [q["text"] for q in read_jsonl(args.dataset / "queries.jsonl", args.queries)]
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    extra = {"write_embed_slice": args.slice} if args.slice else {}
    base = Settings(milvus_uri=str(tmp / "job.db"), rerank=False, **extra)
    embedder = Embedder(base.embed_model, device=base.embed_device).load()
    out: dict[str, object] = {
        "docs": len(docs),
        "queries": len(queries),
        "slice": base.write_embed_slice,
    }

    job = IngestJob(base, embedder=embedder)
    stats = job.run([corpus], progress=False)
    job.store.close()
    out["job"] = {
        "seconds": stats.seconds,
        "docs_per_s": stats.documents / stats.seconds,
        "passages": stats.passages,
    }
    print(
        f"ingest job: {stats.documents} docs, {stats.passages} passages, {stats.seconds:.1f} s, "
        f"{stats.documents / stats.seconds:.1f} docs/s",
        flush=True,
    )

    s = base.model_copy(update={"milvus_uri": str(tmp / "api.db"), "writes": "on"})
    with LiveServer(create_app(s, embedder=embedder)) as srv:
        remote = RemoteIngest(srv.url, None)
        rstats = remote.run([corpus], progress=False)
        out["api"] = {
            "seconds": rstats.seconds,
            "docs_per_s": rstats.documents / rstats.seconds,
            "passages": rstats.passages,
        }
        print(
            f"write API:  {rstats.documents} docs, {rstats.passages} passages, "
            f"{rstats.seconds:.1f} s, {rstats.documents / rstats.seconds:.1f} docs/s",
            flush=True,
        )

        client = httpx.Client(timeout=120)

        def searches(qs: list[str]) -> list[float]:
            lat = []
            for q in qs:
                t = time.perf_counter()
                r = client.post(f"{srv.url}/v1/search", json={"query": q, "rerank": False})
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
            return lat

        searches(queries[:10])  # warm-up (not counted)
        idle = searches(queries)
        stop = threading.Event()
        written = [0, 0.0]

        def writer() -> None:
            t0 = time.perf_counter()
            at = 0
            with httpx.Client(timeout=300) as wc:
                while not stop.is_set() and at < len(load_docs):
                    batch = [
                        {"id": f"load-{d['_id']}", "title": d.get("title", ""), "text": d["text"]}
                        for d in load_docs[at : at + args.load_batch]
                    ]
                    r = wc.post(f"{srv.url}/v1/documents", json={"documents": batch})
                    assert r.status_code == 200, r.text
                    at += len(batch)
            written[0], written[1] = at, time.perf_counter() - t0

        w = threading.Thread(target=writer)
        w.start()
        time.sleep(1.0)  # the load is running
        loaded = searches(queries)
        stop.set()
        w.join()
        out["search_idle_ms"] = {
            "p50": pct(idle, 0.5),
            "p95": pct(idle, 0.95),
            "mean": statistics.mean(idle),
        }
        out["search_under_writes_ms"] = {
            "p50": pct(loaded, 0.5),
            "p95": pct(loaded, 0.95),
            "mean": statistics.mean(loaded),
        }
        out["load"] = {
            "docs": written[0],
            "seconds": written[1],
            "docs_per_s": written[0] / written[1],
        }
        print(f"search idle:         p50 {pct(idle, 0.5):.1f} ms  p95 {pct(idle, 0.95):.1f} ms")
        print(
            f"search under writes: p50 {pct(loaded, 0.5):.1f} ms  p95 {pct(loaded, 0.95):.1f} ms "
            f"(writer: {written[0]} docs in {written[1]:.1f} s, "
            f"{written[0] / written[1]:.1f} docs/s)"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
