"""BEIR-format evaluation: dataset checks, ranx measures on hand-checkable rankings, every mode, the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from conftest import corpus_records, write_jsonl

from evaluation import (
    DatasetError,
    EvalError,
    default_collection,
    evaluate,
    load_dataset,
    measure,
)
from evaluation.cli import add_eval_arguments, run_eval_cli
from pipeline.config import Settings

EXTRA_DOCS = [
    {
        "_id": "telescope",
        "title": "Telescopes",
        "text": "A telescope gathers light with lenses or mirrors so astronomers can observe distant "
        "stars, planets and galaxies.",
    },
    {
        "_id": "vaccine",
        "title": "Vaccines",
        "text": "A vaccine trains the immune system to recognise a virus or bacterium, producing "
        "antibodies without causing the disease.",
    },
]
QUERIES = {
    "q1": "How do plants turn sunlight and water into glucose?",
    "q2": "What makes sea levels rise and fall with the moon?",
    "q3": "Which programming language has readable syntax for data science?",
    "q4": "lava and ash escaping from a magma chamber",
    "q5": "an unjudged query that must not be run",
}
# q4 also judges a document that is not in the corpus: its recall can never exceed 0.5.
QRELS = [("q1", "photosynthesis"), ("q2", "tides"), ("q3", "python"), ("q4", "volcano")]
QRELS += [("q4", "not-in-corpus"), ("q9", "coffee")]  # q9 has no query text: skipped


def make_dataset(root: Path, qrels: list[tuple[str, str]] = QRELS, split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "corpus.jsonl", corpus_records() + EXTRA_DOCS)
    write_jsonl(root / "queries.jsonl", [{"_id": k, "text": v} for k, v in QUERIES.items()])
    write_qrels(root, qrels, split)
    return root


def write_qrels(root: Path, qrels: list[tuple[str, str]], split: str) -> None:
    (root / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t1" for q, d in qrels)]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def settings_for(tmp: Path, **kw: object) -> Settings:
    return Settings(milvus_uri=str(tmp / "e.db"), embed_device="cpu", **kw)


def expected(rankings: dict[str, list[str]], qrels: dict[str, set[str]]) -> dict[str, float]:
    """Binary-relevance nDCG@10, Recall@10/@100, MRR@10 by hand (the textbook formulas)."""
    out = {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for qid, rel in qrels.items():
        ranking = rankings.get(qid, [])
        ranks = [i for i, d in enumerate(ranking, 1) if d in rel]
        dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= 10)
        idcg = sum(1 / math.log2(i + 1) for i in range(1, min(len(rel), 10) + 1))
        out["ndcg@10"] += dcg / idcg
        out["recall@10"] += sum(r <= 10 for r in ranks) / len(rel)
        out["recall@100"] += sum(r <= 100 for r in ranks) / len(rel)
        out["mrr@10"] += 1 / ranks[0] if ranks and ranks[0] <= 10 else 0.0
    return {k: v / len(qrels) for k, v in out.items()}


# --- dataset checks (no models) -------------------------------------------------------------------


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset directory"):
        load_dataset(tmp_path / "nope")
    root = make_dataset(tmp_path / "ds")
    (root / "corpus.jsonl").rename(root / "c.bak")
    with pytest.raises(DatasetError, match=r"missing file: .*corpus\.jsonl"):
        load_dataset(root)
    (root / "c.bak").rename(root / "corpus.jsonl")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"missing file: .*queries\.jsonl"):
        load_dataset(root)
    make_dataset(root)
    with pytest.raises(DatasetError, match=r"missing file: .*qrels/dev\.tsv \(splits here: test\)"):
        load_dataset(root, "dev")


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    qpath = root / "queries.jsonl"
    good = qpath.read_text()
    qpath.write_text(good + "{not json\n")
    with pytest.raises(DatasetError, match=rf"{qpath}:6: invalid JSON"):
        load_dataset(root)
    qpath.write_text(good + '{"_id": "q7"}\n')
    with pytest.raises(DatasetError, match=rf"{qpath}:6: missing or non-string 'text'"):
        load_dataset(root)
    qpath.write_text(good)
    rpath = root / "qrels" / "test.tsv"
    rpath.write_text("query-id\tcorpus-id\tscore\nq1\tphotosynthesis\t1\nq2 only-two\n")
    with pytest.raises(DatasetError, match=rf"{rpath}:3: expected 'query-id"):
        load_dataset(root)
    rpath.write_text("query-id\tcorpus-id\tscore\nq1\tphotosynthesis\thigh\n")
    with pytest.raises(DatasetError, match=rf"{rpath}:2: score 'high' is not a number"):
        load_dataset(root)


def test_dataset_keeps_judged_queries_only(tmp_path: Path) -> None:
    data = load_dataset(make_dataset(tmp_path / "ds"), "test")
    assert list(data.queries) == ["q1", "q2", "q3", "q4"]  # q5 unjudged, q9 unknown
    assert data.unknown_queries == ["q9"]
    assert data.qrels["q4"] == {"volcano": 1, "not-in-corpus": 1}
    assert list(load_dataset(tmp_path / "ds", "test", max_queries=2).queries) == ["q1", "q2"]
    name = default_collection(tmp_path / "ds", "sentence-transformers/all-MiniLM-L6-v2")
    assert name.startswith("eval_ds_") and len(name) == len("eval_ds_") + 8


def cli(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


def test_cli_bad_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\n")
    assert run_eval_cli(cli([str(root), "-q"]), settings_for(tmp_path)) == 2
    assert f"{root / 'qrels' / 'test.tsv'}:2" in capsys.readouterr().err.replace("\n", "")
    with pytest.raises(SystemExit) as exc:
        cli([str(root), "--modes", "dense,colbert"])
    assert exc.value.code == 2


def test_rerank_mode_without_reranker_fails_fast(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    with pytest.raises(EvalError, match="WINNOW_RERANK=on"):
        evaluate(settings_for(tmp_path, rerank=False), root, modes=["rerank"], progress=False)
    missing = settings_for(tmp_path, rerank_model=str(tmp_path / "no-such-model"))
    with pytest.raises(EvalError, match=r"rerank mode: reranker .*no such directory"):
        evaluate(missing, root, modes=["dense", "rerank"], progress=False)
    assert not (tmp_path / "e.db").exists()  # nothing was ingested before failing


def test_measure_matches_hand_values() -> None:
    runs = {
        "a": [("d1", 0.9), ("d2", 0.8)],  # relevant at rank 1
        "b": [("x", 0.5), ("d3", 0.5)],  # relevant at rank 2, tied scores: order kept
        "c": [("y", 0.7)],  # relevant never retrieved
    }
    qrels = {"a": {"d1": 1}, "b": {"d3": 1}, "c": {"d9": 1}}
    got = measure(qrels, runs, "t")
    rankings = {q: [d for d, _ in r] for q, r in runs.items()}
    want = expected(rankings, {q: set(r) for q, r in qrels.items()})
    assert got == pytest.approx(want, abs=1e-9)
    assert got["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


# --- end to end with the real MiniLM and Milvus Lite ---------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, embedder):
    """One dataset and Milvus Lite file, ingested by a first dense+hybrid+bm25 evaluation."""
    tmp = tmp_path_factory.mktemp("eval")
    root = make_dataset(tmp / "tinybeir")
    report = evaluate(
        settings_for(tmp),
        root,
        split="test",
        modes=["dense", "hybrid", "bm25"],
        top_k=100,
        embedder=embedder,
        progress=False,
    )
    return tmp, root, report


def rankings_of(report, mode: str) -> dict[str, list[str]]:
    return {q: [d for d, _ in r] for q, r in report.result(mode).runs.items()}


@pytest.mark.slow
def test_modes_measured_right(ingested) -> None:
    _, _, report = ingested
    assert [r.mode for r in report.results] == ["dense", "hybrid", "bm25"]
    assert report.queries == 4 and report.unknown_queries == 1
    assert report.ingest_embedded == 8  # one passage per document, first run
    qrels = {q: {d for qq, d in QRELS if qq == q} for q in ("q1", "q2", "q3", "q4")}
    for r in report.results:
        assert set(r.runs) == set(qrels)
        assert r.queries == 4 and r.seconds > 0 and r.queries_per_s > 0
        assert r.metrics == pytest.approx(expected(rankings_of(report, r.mode), qrels), abs=1e-9)
        # q4 judges a document that is not in the corpus: recall is at most 1/2 there
        assert r.metrics["recall@100"] <= (3 + 0.5) / 4 + 1e-9
    dense = rankings_of(report, "dense")
    assert all(dense[q][0] == next(iter(qrels[q] - {"not-in-corpus"})) for q in qrels)
    assert report.result("dense").metrics["mrr@10"] == pytest.approx(1.0)
    assert len(dense["q1"]) == 8  # top_n = top_k: the whole ranking is judged


@pytest.mark.slow
def test_rerun_skips_ingest_and_rank_two_is_judged(ingested, embedder) -> None:
    tmp, root, first = ingested
    second_doc = {q: r[1] for q, r in rankings_of(first, "dense").items()}
    write_qrels(root, [(q, d) for q, d in second_doc.items()], "dev")  # relevant = rank 2
    report = evaluate(
        settings_for(tmp), root, split="dev", modes=["dense"], embedder=embedder, progress=False
    )
    assert report.ingest_embedded == 0  # unchanged corpus: nothing re-embedded
    assert report.collection == first.collection
    m = report.result("dense").metrics
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert m["recall@10"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cli_writes_runs_and_report(ingested, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, root, first = ingested
    out, md, trec = tmp / "run.json", tmp / "report.md", tmp / "run.trec"
    args = cli([str(root), "--modes", "bm25", "--skip-ingest", "-q"])
    args.output, args.report = str(out), str(md)
    assert run_eval_cli(args, settings_for(tmp)) == 0
    text = capsys.readouterr().out
    assert "nDCG@10" in text and "bm25" in text
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["collection"] == first.collection
    assert next(iter(saved["runs"]["bm25"]["q2"])) == "tides"
    assert saved["metrics"]["bm25"] == pytest.approx(first.result("bm25").metrics)
    table = md.read_text()
    assert "| mode | nDCG@10 | R@10 | R@100 | MRR@10 | queries | queries/s | seconds |" in table
    assert "| bm25 |" in table
    first.save_runs(trec)
    lines = trec.read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "photosynthesis", "1"]
    assert {ln.split()[5] for ln in lines} == {"dense", "hybrid", "bm25"}


@pytest.mark.slow
def test_rerank_mode_reorders_within_candidates(
    ingested, embedder, tiny_reranker_dir: Path
) -> None:
    tmp, root, _ = ingested
    settings = settings_for(
        tmp, rerank_model=str(tiny_reranker_dir), rerank_device="cpu", rerank_dtype="float32"
    )
    report = evaluate(
        settings,
        root,
        modes=["hybrid", "rerank"],
        top_k=4,
        embedder=embedder,
        progress=False,
        ingest=False,
    )
    hybrid, rerank = report.result("hybrid"), report.result("rerank")
    assert rerank.label == "rerank (hybrid)" and report.rerank_model == str(tiny_reranker_dir)
    for qid, ranking in rerank.runs.items():
        assert {d for d, _ in ranking} == {d for d, _ in hybrid.runs[qid]}  # same candidates
        scores = [s for _, s in ranking]
        assert all(0.0 <= s <= 1.0 for s in scores)  # P(yes)
        assert scores == sorted(scores, reverse=True)
    assert rerank.metrics["recall@100"] == pytest.approx(hybrid.metrics["recall@100"])


@pytest.mark.slow
def test_fusion_settings_reach_the_hybrid_mode(ingested, embedder) -> None:
    """--fusion / WINNOW_FUSION is used by eval's hybrid mode (scores tell the rankers apart)."""
    tmp, root, first = ingested
    k = Settings().rrf_k
    assert first.fusion == f"rrf k={k}"
    rrf_max = 2 / (k + 1)  # RRF: at best rank 1 in both lists
    assert max(s for r in first.result("hybrid").runs.values() for _, s in r) <= rrf_max + 1e-6
    dense = first.result("dense").runs
    for fusion, weights in (("weighted", (0.7, 0.3)), ("normalized", (1.0, 0.0))):
        settings = settings_for(
            tmp, fusion=fusion, fusion_dense_weight=weights[0], fusion_bm25_weight=weights[1]
        )
        report = evaluate(
            settings, root, modes=["hybrid"], embedder=embedder, progress=False, ingest=False
        )
        assert report.fusion == f"{fusion} {weights[0]:g}/{weights[1]:g}"
        assert f"hybrid fusion `{report.fusion}`" in report.markdown()
        runs = report.result("hybrid").runs
        top = [r[0][1] for r in runs.values()]
        assert all(s > rrf_max for s in top)  # weighted / min-max scores, not RRF's
        if fusion == "normalized":  # BM25 weight 0: the dense order, top score 1.0 each
            assert all(s == pytest.approx(1.0) for s in top)
            assert {q: [d for d, _ in r] for q, r in runs.items()} == {
                q: [d for d, _ in r] for q, r in dense.items()
            }
