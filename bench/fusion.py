"""Fusion study: which hybrid fusion (and weight, and RRF k) ranks a BEIR split best.

It reuses the collection ``python -m pipeline eval`` ingested (run that once first) and never
ingests. Each query is embedded once and its dense and BM25 passage lists (``top_k`` each, as
``hybrid_search`` asks Milvus for) are fetched once; every method is then computed from the two
lists, exactly as Milvus computes it:

- ``rrf k``: Σ 1/(k + rank) per passage (Milvus ``RRFRanker(k)``);
- ``weighted w``: w·(1 + cos)/2 + (1 − w)·2·atan(bm25)/π (Milvus ``WeightedRanker(w, 1 − w)``,
  ``norm_score=True``; its normalisation, the same in Lite and a server);
- ``weighted-raw w``: w·cos + (1 − w)·bm25 (``WeightedRanker(..., norm_score=False)``; study only);
- ``normalized w``: w·minmax(cos) + (1 − w)·minmax(bm25) (``pipeline.fusion``, the product's code).

A passage absent from one list gets nothing from it; equal scores are ordered by passage id, as
Milvus's sort breaks ties. The fused passages (best ``top_k``) are folded into documents by
``SearchService``'s own ``fold_documents`` and measured by ranx (``evaluation.report``).
``--check N`` replays the first N queries through ``MilvusStore.hybrid`` with Milvus's rankers
(and the product's normalized path) and counts the queries whose order differs from the study's.

Model selection: the best configuration on all queries, and a K-fold check (queries shuffled
with a fixed seed; per fold, the configuration picked on the other K − 1 folds, reported on the
held-out one) so the pick is not an artefact of fitting the whole split.

    python -m pipeline eval ../shared/data/scifact --split train --modes dense --milvus-uri data/eval.db
    python bench/fusion.py ../shared/data/scifact --split train --milvus-uri data/eval.db \\
        --check 100 --json runs/fusion.json --markdown runs/fusion.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.domain import Hit  # noqa: E402
from pipeline.fusion import FUSIONS, FusionParams, combine  # noqa: E402

Fuse = Callable[[list[Hit], list[Hit], int], list[Hit]]
WEIGHTS = [round(0.05 * i, 2) for i in range(1, 20)]  # dense weight; BM25 gets 1 − w
RRF_KS = [1, 2, 5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 400]
RAW_BM25_WEIGHTS = [0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1]  # dense weight 1


@dataclass(frozen=True, slots=True)
class Config:
    method: str  # a name of pipeline.fusion.FUSIONS, or weighted-raw (study only)
    param: float  # k for a method reading rrf_k, else the dense weight (weighted-raw: the BM25
    # weight, dense 1)

    @property
    def weights(self) -> tuple[float, float]:
        if self.method == "weighted-raw":
            return 1.0, self.param
        return self.param, round(1.0 - self.param, 4)

    @property
    def label(self) -> str:
        if self.method in FUSIONS and FUSIONS[self.method].param == "rrf_k":
            return f"{self.method} k={self.param:g}"
        d, b = self.weights
        return f"{self.method} {d:g}/{b:g}"


def fuser(cfg: Config) -> Fuse:
    """The fusion function of one configuration: the registry's formula (``pipeline.fusion``, what
    Milvus computes for its rankers and the product computes for the rest), or the study-only
    ``weighted-raw``."""
    w = cfg.weights
    if cfg.method == "weighted-raw":
        return lambda d, b, k: combine(d, b, k, lambda r, _rank, h: w[r] * h.score)
    method = FUSIONS[cfg.method]
    params = FusionParams(rrf_k=int(cfg.param) if method.param == "rrf_k" else 5, weights=w)
    return lambda d, b, k: method.fuse(d, b, params, k)


def grid() -> list[Config]:
    """Every registered fusion method over its parameter's range, and the study-only raw sum."""
    configs = [
        Config(name, p)
        for name, method in FUSIONS.items()
        for p in (RRF_KS if method.param == "rrf_k" else WEIGHTS)
    ]
    return configs + [Config("weighted-raw", w) for w in RAW_BM25_WEIGHTS]


def fetch(args: argparse.Namespace) -> tuple[dict, dict, dict[str, tuple[list[Hit], list[Hit]]]]:
    """Queries, qrels and each query's (dense, BM25) passage lists, from the eval collection."""
    from evaluation.data import default_collection, load_dataset
    from pipeline.config import Settings
    from pipeline.embedding import Embedder
    from pipeline.store import MilvusStore

    settings = Settings(milvus_uri=args.milvus_uri)
    data = load_dataset(args.dataset, args.split, args.max_queries)
    name = args.collection or default_collection(data.root, settings.embed_model)
    store = MilvusStore.from_settings(settings.store, name)
    model, dim = store.open()
    if model is None:
        raise SystemExit(f"no collection {name} in {args.milvus_uri}: run `pipeline eval` first")
    embedder = Embedder(settings.embed_model, device=settings.embed_device).load()
    store.check_model(model, dim, settings.embed_model, embedder.dim)
    lists: dict[str, tuple[list[Hit], list[Hit]]] = {}
    from tqdm import tqdm

    for qid, text in tqdm(data.queries.items(), desc="fetch", unit=" q", disable=args.quiet):
        vec = embedder.embed([text], query=True)[0]  # one at a time, as SearchService does
        lists[qid] = (store.dense(vec, args.top_k), store.bm25(text, args.top_k))
    args._store, args._embedder = store, embedder
    return data.queries, data.qrels, lists


def rankings(fuse: Fuse, lists: dict, k: int) -> dict[str, list[tuple[str, float]]]:
    """Fused passages folded into documents by the service's own rule."""
    from pipeline.ranking import fold_documents

    out = {}
    for qid, (dense, bm25) in lists.items():
        fused = fuse(dense, bm25, k)
        out[qid] = [(h.doc_id, s) for h, s in fold_documents([(h, h.score) for h in fused], k)]
    return out


def check_against_milvus(args: argparse.Namespace, queries: dict, lists: dict) -> dict:
    """Replay the first ``--check`` queries through MilvusStore.hybrid per method; count mismatches."""
    store, embedder = args._store, args._embedder
    picks = [
        Config(name, p)
        for name, method in FUSIONS.items()
        for p in ((60, 20) if method.param == "rrf_k" else (0.5, 0.8))
    ]
    out = {}
    qids = list(lists)[: args.check]
    for cfg in picks:
        s = store  # one open store: switch its fusion setting per method
        s.fusion, s.fusion_weights = cfg.method, cfg.weights
        if FUSIONS[cfg.method].param == "rrf_k":
            s.rrf_k = int(cfg.param)
        fuse, differ, score_err = fuser(cfg), 0, 0.0
        for qid in qids:
            vec = embedder.embed([queries[qid]], query=True)[0]
            got = s.hybrid(vec, queries[qid], args.top_k)
            want = fuse(*lists[qid], args.top_k)
            if [h.id for h in got] != [h.id for h in want]:
                differ += 1
            score_err = max(
                [score_err] + [abs(a.score - b.score) for a, b in zip(got, want, strict=False)]
            )
        out[cfg.label] = {
            "queries": len(qids),
            "order_differs": differ,
            "max_score_diff": score_err,
        }
    return out


def kfold(
    per_query: dict[Config, dict[str, float]], qids: Sequence[str], folds: int, seed: int
) -> list[dict]:
    """Per fold: the configuration with the best mean on the other folds, and its held-out mean."""
    order = sorted(qids)
    random.Random(seed).shuffle(order)
    parts = [order[i::folds] for i in range(folds)]
    base = Config("rrf", 60)
    out = []
    for i, test in enumerate(parts):
        train = [q for j, p in enumerate(parts) if j != i for q in p]
        best = max(per_query, key=lambda c: mean(per_query[c], train))
        per_method = {}
        for method in FUSIONS:
            cands = [c for c in per_query if c.method == method]
            pick = max(cands, key=lambda c: mean(per_query[c], train))
            per_method[method] = {"pick": pick.label, "test": mean(per_query[pick], test)}
        out.append(
            {
                "fold": i + 1,
                "queries": len(test),
                "pick": best.label,
                "train": mean(per_query[best], train),
                "test": mean(per_query[best], test),
                "rrf60_test": mean(per_query[base], test),
                "per_method": per_method,
            }
        )
    return out


def mean(values: dict[str, float], qids: Sequence[str]) -> float:
    return sum(values[q] for q in qids) / len(qids)


def paired(a: dict[str, float], b: dict[str, float], seed: int, n: int = 2000) -> dict:
    """Mean per-query difference a − b with a 95% bootstrap interval (queries resampled)."""
    qids = sorted(a)
    diffs = [a[q] - b[q] for q in qids]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(n))
    return {
        "diff": sum(diffs) / len(diffs),
        "ci95": (means[int(0.025 * n)], means[int(0.975 * n) - 1]),
        "better": sum(d > 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--split", default="train")
    ap.add_argument("--milvus-uri", required=True)
    ap.add_argument("--collection")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--max-queries", type=int)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=0, help="replay N queries through Milvus")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    from evaluation.report import measure, measure_per_query
    from pipeline.logs import setup_logging

    setup_logging("WARNING")
    queries, qrels, lists = fetch(args)
    metrics = ["ndcg@10", "recall@100"]
    rows: list[dict] = []
    per_query: dict[Config, dict[str, float]] = {}
    singles = {
        "dense": lambda d, b, k: d[:k],
        "bm25": lambda d, b, k: b[:k],
    }
    for name, fuse in singles.items():
        m = measure_per_query(qrels, rankings(fuse, lists, args.top_k), metrics)
        rows.append({"config": name, **{x: mean(m[x], list(qrels)) for x in metrics}})
    for cfg in grid():
        runs = rankings(fuser(cfg), lists, args.top_k)
        m = measure_per_query(qrels, runs, metrics)
        per_query[cfg] = m["ndcg@10"]
        row = {"config": cfg.label, "method": cfg.method, "weights": cfg.weights}
        row.update({x: mean(m[x], list(qrels)) for x in metrics})
        if cfg == Config("rrf", 60):  # the per-query path agrees with evaluation.measure
            whole = measure(qrels, runs, "rrf")
            assert all(abs(whole[x] - row[x]) < 1e-9 for x in metrics), (whole, row)
        rows.append(row)
    folds = kfold(per_query, list(qrels), args.folds, args.seed)
    best = {
        method: max(
            (c for c in per_query if c.method == method),
            key=lambda c: mean(per_query[c], list(qrels)),
        )
        for method in (*FUSIONS, "weighted-raw")
    }
    base = Config("rrf", 60)
    pairs = [(best[m], base) for m in best] + [(best["normalized"], best["rrf"])]
    comparisons = [
        {"a": a.label, "b": b.label, **paired(per_query[a], per_query[b], args.seed)}
        for a, b in pairs
    ]
    result = {
        "dataset": str(args.dataset),
        "split": args.split,
        "queries": len(qrels),
        "top_k": args.top_k,
        "rows": rows,
        "folds": folds,
        "paired": comparisons,
    }
    if args.check:
        result["milvus_check"] = check_against_milvus(args, queries, lists)
    args._store.close()
    text = markdown(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


def markdown(result: dict) -> str:
    lines = ["| method | weights (dense/BM25) or k | nDCG@10 | R@100 |", "|---|---|---:|---:|"]
    for r in result["rows"]:
        cfg = r["config"]
        method, _, param = cfg.partition(" ")
        lines.append(f"| {method} | {param or '—'} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} |")
    lines += [
        "",
        "| fold | queries | pick (other folds) | nDCG@10 other folds | held out | rrf k=60 held out |",
    ]
    lines.append("|---:|---:|---|---:|---:|---:|")
    for f in result["folds"]:
        lines.append(
            f"| {f['fold']} | {f['queries']} | {f['pick']} | {f['train']:.4f} | {f['test']:.4f} "
            f"| {f['rrf60_test']:.4f} |"
        )
    n = len(result["folds"])
    lines.append(
        f"| mean | | | {sum(f['train'] for f in result['folds']) / n:.4f} "
        f"| {sum(f['test'] for f in result['folds']) / n:.4f} "
        f"| {sum(f['rrf60_test'] for f in result['folds']) / n:.4f} |"
    )
    lines += [
        "",
        "| fold | " + " | ".join(f"{m} pick → held out" for m in FUSIONS) + " |",
    ]
    lines.append("|---:|" + "---|" * len(FUSIONS))
    for f in result["folds"]:
        pm = f["per_method"]
        cells = [f"{pm[m]['pick']} → {pm[m]['test']:.4f}" for m in FUSIONS]
        lines.append(f"| {f['fold']} | " + " | ".join(cells) + " |")
    means = [sum(f["per_method"][m]["test"] for f in result["folds"]) / n for m in FUSIONS]
    lines.append("| mean | " + " | ".join(f"{v:.4f}" for v in means) + " |")
    lines += ["", "| a − b (nDCG@10, per query) | mean | 95% CI | queries better / worse |"]
    lines.append("|---|---:|---|---:|")
    for c in result["paired"]:
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['a']} − {c['b']} | {c['diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] "
            f"| {c['better']} / {c['worse']} |"
        )
    if "milvus_check" in result:
        lines += ["", "| replayed through Milvus | queries | order differs | max score diff |"]
        lines.append("|---|---:|---:|---:|")
        for label, c in result["milvus_check"].items():
            lines.append(
                f"| {label} | {c['queries']} | {c['order_differs']} | {c['max_score_diff']:.2e} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
