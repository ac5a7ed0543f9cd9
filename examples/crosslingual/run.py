"""Cross-lingual example: English documents, English and Chinese questions, through the real pipeline.

    python examples/crosslingual/run.py            # or: make crosslingual
    python examples/crosslingual/run.py --embed-model intfloat/multilingual-e5-small --rerank

The 16 documents (``corpus.jsonl``) are English; ``queries.jsonl`` asks about them in English
(``en``), in Chinese (``zh``) and in Chinese around a Latin-script term such as "CRISPR" or
"GPS" (``zh+latin``); ``qrels/test.tsv`` names the document each question is about (the folder
is BEIR layout, so ``python -m pipeline eval examples/crosslingual`` works on it too).

The corpus is ingested into its own Milvus Lite file (``data/crosslingual.db``) with the ``jieba``
BM25 analyzer (Chinese word segmentation, Latin words kept whole), one collection per embedding
model and analyzer. Every question then goes through ``SearchService``, as the API serves it, in
dense, bm25 and hybrid recall and, with ``--rerank``, reranked by the configured Qwen3-Reranker.
The table gives the rank of the expected document per mode; the summary, hit@1 and hit@3 per
language group.

What to expect with the default embedder (all-MiniLM-L6-v2 is English-only): English questions
find their document; ``zh+latin`` questions find theirs through BM25 (jieba keeps "CRISPR" a word);
plain Chinese questions mostly do not, because nothing in the default stack maps Chinese onto
English. That needs a multilingual embedder (``--embed-model``) and/or the reranker, which are
not shipped: see README "Cross-lingual search".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import FIELDS, Settings, add_settings_arguments, settings_or_exit  # noqa: E402

MODES = ("dense", "bm25", "hybrid")
GROUPS = ("en", "zh", "zh+latin")


@dataclass(slots=True)
class Outcome:
    qid: str
    lang: str
    text: str
    expected: str
    ranks: dict[str, int | None] = field(
        default_factory=dict
    )  # mode -> 1-based rank, None = missed


def load_queries(root: Path = HERE) -> list[Outcome]:
    """Questions with their language group and the one document each is about."""
    qrels: dict[str, str] = {}
    for line in (root / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, doc, _ = line.split("\t")
        qrels[qid] = doc
    out = []
    for line in (root / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        out.append(Outcome(q["_id"], q["lang"], q["text"], qrels[q["_id"]]))
    return out


def example_settings(settings: Settings) -> Settings:
    """The example's own defaults where neither a flag nor a WINNOW_* variable chose otherwise."""
    defaults = {"milvus_uri": str(ROOT / "data" / "crosslingual.db"), "analyzer": "jieba"}
    update = {
        k: v
        for k, v in defaults.items()
        if getattr(settings, k) == FIELDS[k].default and f"WINNOW_{k.upper()}" not in os.environ
    }
    s = settings.model_copy(update=update)
    if "WINNOW_COLLECTION" not in os.environ and s.collection == "winnow":
        digest = hashlib.sha1(s.embed_model.encode(), usedforsecurity=False).hexdigest()[:8]
        s = s.model_copy(update={"collection": f"crosslingual_{s.analyzer}_{digest}"})
    return s


async def _search_all(runtime, queries: list[Outcome], top_k: int, rerank: bool) -> None:
    modes = [*MODES, "rerank"] if rerank else list(MODES)
    for q in queries:
        for mode in modes:
            res = await runtime.service.search(
                q.text,
                top_k=top_k,
                top_n=top_k,
                mode="hybrid" if mode == "rerank" else mode,
                rerank=mode == "rerank",
            )
            docs = [r.doc_id for r in res.results]
            q.ranks[mode] = docs.index(q.expected) + 1 if q.expected in docs else None


def run(
    settings: Settings,
    *,
    rerank: bool = False,
    top_k: int = 5,
    embedder=None,
    reranker=None,
    progress: bool = False,
) -> list[Outcome]:
    """Ingest the example corpus (unchanged documents are skipped) and run every question."""
    from ingest.job import IngestJob
    from pipeline.runtime import Runtime

    settings = settings.model_copy(update={"rerank": rerank or reranker is not None})
    runtime = Runtime(settings, embedder=embedder, reranker=reranker)
    try:
        runtime.load(reranker=rerank)
        IngestJob(settings, embedder=runtime.embedder, store=runtime.store).run(
            [HERE / "corpus.jsonl"], progress=progress
        )
        runtime.check_collection()
        queries = load_queries()

        async def go() -> None:
            try:
                await _search_all(runtime, queries, top_k, rerank or reranker is not None)
            finally:
                if runtime.reranker is not None and reranker is None:
                    await runtime.aclose()

        asyncio.run(go())
    finally:
        runtime.store.close()
    return queries


def summary(queries: list[Outcome]) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {mode: {"hit@1", "hit@3"}}}`` over the questions of each language group."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in GROUPS:
        qs = [q for q in queries if q.lang == group]
        out[group] = {
            mode: {
                f"hit@{n}": sum(1 for q in qs if (q.ranks[mode] or 99) <= n) / len(qs)
                for n in (1, 3)
            }
            for mode in qs[0].ranks
        }
    return out


def report(queries: list[Outcome], settings: Settings) -> None:
    from rich.console import Console
    from rich.table import Table

    modes = list(queries[0].ranks)
    t = Table(title=f"cross-lingual example · {settings.embed_model} · BM25 {settings.analyzer}")
    for col in ("id", "lang", "question", "expected", *modes):
        t.add_column(col, justify="right" if col in modes else "left")
    for q in queries:
        cells = [str(q.ranks[m]) if q.ranks[m] else "—" for m in modes]
        t.add_row(q.qid, q.lang, q.text, q.expected, *cells)
    s = Table(title="hit@1 / hit@3 per language group (rank of the expected document)")
    s.add_column("group")
    for m in modes:
        s.add_column(m, justify="right")
    for group, per_mode in summary(queries).items():
        s.add_row(group, *(f"{v['hit@1']:.2f} / {v['hit@3']:.2f}" for v in per_mode.values()))
    console = Console()
    console.print(t)
    console.print(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rerank", action="store_true", help="also rerank hybrid recall (Qwen3)")
    p.add_argument("--top-k", type=int, default=5, help="candidates per question (default 5)")
    p.add_argument("--json", type=Path, help="write the ranks and the summary as JSON")
    add_settings_arguments(p, only=[n for n in FIELDS if n != "rerank"])
    args = p.parse_args(argv)
    settings = example_settings(settings_or_exit(p, args))
    from pipeline.logs import setup_logging
    from pipeline.model_files import ModelUnavailable

    setup_logging("WARNING")
    try:
        queries = run(settings, rerank=args.rerank, top_k=args.top_k, progress=False)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(queries, settings)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"queries": [_as_dict(q) for q in queries], "summary": summary(queries)},
                ensure_ascii=False,
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


def _as_dict(q: Outcome) -> dict:
    return {"id": q.qid, "lang": q.lang, "text": q.text, "expected": q.expected, "ranks": q.ranks}


if __name__ == "__main__":
    sys.exit(main())
