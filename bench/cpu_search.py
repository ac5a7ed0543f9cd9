"""Benchmark: the default ``/v1/search`` on a CPU, by cores and ``top_k`` (issue 30 item 1).

A user's setup, over real HTTP: SciFact documents ingested into Milvus Lite with the shipped
all-MiniLM-L6-v2, the API as ``python -m pipeline serve`` builds it (``create_app(Settings(...))``, every
default left as it is — dtype auto, the CPU defaults of pipeline/runtime.py — but the score cache,
off since the searches repeat candidates), the reranker the real
Qwen3-Reranker-0.6B architecture with random weights (bench/rerank.py; speed does not depend on the
values). For each core count a fresh child process pinned to that many cores (``taskset``,
``OMP_NUM_THREADS``) starts the server (time to ready = model load + kernel compile + the cost
model's start-up profile), then for each ``top_k`` sends ``--queries`` searches with the defaults
(the CPU budget) and the same searches asking for everything (``rerank_budget_ms`` = the deadline):
latency and how many of the candidates were reranked.

    .venv/bin/python bench/cpu_search.py --cores 1,2 --top-k 10,20,50 --queries 3 \
        --json bench/results/cpu-search.json

Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from rerank import SCIFACT, build_model_dir, emit, header  # noqa: E402


def scifact_subset(n_docs: int, n_queries: int) -> tuple[list[dict], list[str]]:
    """The first ``n_docs`` documents plus every judged document of the first ``n_queries`` judged
    train queries (so each query has something relevant to find), and those queries."""
    from evaluation.data import read_qrels, read_queries

    queries = read_queries(SCIFACT / "queries.jsonl")
    judged = read_qrels(SCIFACT / "qrels" / "train.tsv")
    chosen = [q for q in judged if q in queries][:n_queries]
    wanted = set().union(*(judged[q] for q in chosen))
    docs = []
    with (SCIFACT / "corpus.jsonl").open() as fh:
        for i, line in enumerate(fh):
            d = json.loads(line)
            if i < n_docs or d["_id"] in wanted:
                docs.append(d)
    return docs, [queries[q] for q in chosen]


def ingest(db: Path, docs: list[dict]) -> None:
    from ingest.job import IngestJob
    from pipeline.config import Settings
    from testkit.corpus import write_jsonl

    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    job = IngestJob(Settings(milvus_uri=str(db)))
    job.run([write_jsonl(db.parent / "corpus.jsonl", docs)], progress=False)
    job.store.close()


def child(args: argparse.Namespace, cores: int, queries: list[str]) -> dict[str, Any]:
    """One core count: serve, search, report (runs in the pinned child process)."""
    import httpx
    import torch

    from pipeline.api import create_app
    from pipeline.config import Settings
    from pipeline.devices import resolve_dtype
    from pipeline.logs import setup_logging
    from testkit.servers import LiveServer

    setup_logging("WARNING")
    t0 = time.perf_counter()
    # the score cache off: each search here repeats candidates of an earlier one
    settings = Settings(
        milvus_uri=str(args.db), rerank_model=str(args.model_dir), rerank_cache_mb=0
    )
    app = create_app(settings)
    out: dict[str, Any] = {"cores": cores, "torch_threads": torch.get_num_threads(), "rows": []}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.5)
        out["ready_seconds"] = round(time.perf_counter() - t0, 1)
        resolved = app.state.winnow.runtime.settings  # with the CPU defaults filled in
        out["search_rerank_budget_ms"] = resolved.search_rerank_budget_ms
        out["rerank_max_length"] = resolved.rerank_max_length
        out["rerank_deadline_s"] = resolved.rerank_deadline_s
        out["reranker"] = app.state.winnow.runtime.reranker.backend
        out["dtype"] = str(resolve_dtype(resolved.rerank_dtype, "cpu"))
        client.post("/v1/search", json={"query": "warm-up", "top_k": 2})
        for top_k in args.top_k:
            budgets = {
                "default": {},
                "all": {"rerank_budget_ms": int(resolved.rerank_deadline_s * 1000)},
            }
            for label, extra in ((b, budgets[b]) for b in args.budgets):
                for q in queries:
                    t = time.perf_counter()
                    r = client.post("/v1/search", json={"query": q, "top_k": top_k, **extra})
                    seconds = time.perf_counter() - t
                    body = r.json()
                    row = {
                        "top_k": top_k,
                        "budget": label,
                        "status": r.status_code,
                        "seconds": round(seconds, 2),
                        "candidates": body.get("candidates"),
                        "reranked": body.get("reranked"),
                        "timings_ms": body.get("timings_ms"),
                    }
                    out["rows"].append(row)
                    print(json.dumps({"cores": cores, **row}), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cores", default="1,2", help="comma-separated core counts")
    ap.add_argument("--top-k", default="10,20,50")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument(
        "--budgets", default="default,all", help="default (the CPU budget), all (the deadline)"
    )
    ap.add_argument("--docs", type=int, default=300, help="SciFact documents ingested (+ judged)")
    ap.add_argument("--db", type=Path, default=Path("/tmp/winnow-cpu-search/scifact.db"))
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/winnow-bench-qwen3-0.6b"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ingest-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.top_k = [int(k) for k in str(args.top_k).split(",")]
    args.budgets = [b for b in str(args.budgets).split(",") if b]
    docs, queries = scifact_subset(args.docs, args.queries)
    if args.child is not None:
        assert args.out is not None
        args.out.write_text(json.dumps(child(args, args.child, queries)), encoding="utf-8")
        return 0
    if args.ingest_only:
        ingest(args.db, docs)
        return 0
    build_model_dir(args.model_dir)
    # in its own process: Milvus Lite holds its file until the process that opened it exits
    cmd = [
        sys.executable,
        __file__,
        "--ingest-only",
        "--db",
        str(args.db),
        "--docs",
        str(args.docs),
    ]
    subprocess.run([*cmd, "--queries", str(args.queries)], check=True)
    runs = []
    for cores in [int(c) for c in args.cores.split(",")]:
        if cores > (os.cpu_count() or 1):
            runs.append({"cores": cores, "error": f"this machine has {os.cpu_count()} cores"})
            continue
        out = args.db.parent / f"cores-{cores}.json"
        cmd = ["taskset", "-c", f"0-{cores - 1}", sys.executable, __file__, "--child", str(cores)]
        cmd += ["--out", str(out), "--db", str(args.db), "--model-dir", str(args.model_dir)]
        cmd += ["--top-k", ",".join(map(str, args.top_k)), "--queries", str(args.queries)]
        cmd += ["--docs", str(args.docs), "--budgets", ",".join(args.budgets)]
        env = dict(os.environ, OMP_NUM_THREADS=str(cores))
        proc = subprocess.run(cmd, env=env)
        runs.append(
            json.loads(out.read_text())
            if proc.returncode == 0
            else {"cores": cores, "error": proc.returncode}
        )
    report = {**header("bench/cpu_search.py", argv), "documents": len(docs), "runs": runs}
    return emit(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
