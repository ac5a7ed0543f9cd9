"""Ingest into a real Milvus Lite file with the real MiniLM: ranking, idempotence, change, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import corpus_records, write_jsonl

from ingest.job import IngestJob
from ingest.sources import FieldMap
from pipeline.config import Settings
from pipeline.store import MilvusStore, SchemaMismatch

pytestmark = pytest.mark.slow


def settings_for(tmp_path: Path, **kw) -> Settings:
    return Settings(milvus_uri=str(tmp_path / "w.db"), embed_device="cpu", **kw)


def make_corpus_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    recs = corpus_records()
    write_jsonl(root / "corpus.jsonl", recs[:3])
    (root / "docs").mkdir()
    (root / "docs" / "marathon.md").write_text(f"# {recs[3]['title']}\n\n{recs[3]['text']}\n")
    (root / "docs" / "coffee.txt").write_text(recs[4]["text"])
    (root / "table.csv").write_text(
        "id,title,text\n" + f'tides,"{recs[5]["title"]}","{recs[5]["text"]}"\n'
    )
    # problems: a non-UTF-8 file, a malformed JSON line, a record without text, an empty text
    (root / "docs" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "bad.jsonl").write_text(
        '{"_id": "ok1", "text": "A valid line about glaciers and ice sheets."}\n'
        "{not json\n"
        '{"_id": "notext"}\n'
        '{"_id": "empty", "text": "   "}\n'
    )
    return root


def test_ingest_search_and_problems(tmp_path: Path, embedder) -> None:
    corpus = make_corpus_dir(tmp_path / "corpus")
    job = IngestJob(settings_for(tmp_path), embedder=embedder)
    stats = job.run([corpus], progress=False)
    assert stats.documents == 7
    assert stats.files == 6
    reasons = {str(p) for p in stats.problems}
    assert any("latin1.txt" in r and "UTF-8" in r for r in reasons), reasons
    assert any("bad.jsonl:2" in r and "malformed JSON" in r for r in reasons), reasons
    assert any("bad.jsonl:3" in r and "no text field" in r for r in reasons), reasons
    assert any("bad.jsonl:4" in r and "empty text" in r for r in reasons), reasons
    store = job.store
    assert store.count() == 7
    q = embedder.embed(
        ["which gas do plants release when they make sugar from light?"], query=True
    )[0]
    assert store.dense(q, 3)[0].doc_id == "photosynthesis"
    q2 = embedder.embed(["why does the sea level rise and fall?"], query=True)[0]
    hits = store.hybrid(q2, "why does the sea level rise and fall", 3)
    assert hits[0].doc_id == "tides"
    bm = store.bm25("caffeine beans", 2)
    assert bm[0].doc_id == "docs/coffee.txt" and bm[0].score > 0
    md = store.dense(embedder.embed(["42 km foot race"], query=True)[0], 1)[0]
    assert md.doc_id == "docs/marathon.md" and md.title == "Marathon running"


def test_idempotent_and_changed_document(tmp_path: Path, embedder) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", corpus_records())
    s = settings_for(tmp_path)
    first = IngestJob(s, embedder=embedder).run([path], progress=False)
    job = IngestJob(s, embedder=embedder)
    second = job.run([path], progress=False)
    assert first.embedded == 6 and second.embedded == 0 and second.unchanged == 6
    assert job.store.count() == 6
    recs = corpus_records()
    recs[1]["text"] = "Completely new text: volcanic eruptions on Io, a moon of Jupiter. " * 30
    write_jsonl(path, recs)
    third = job.run([path], progress=False)
    assert third.unchanged == 5 and third.deleted == 1
    stored = job.store.ids_by_doc(["volcano"])["volcano"]
    assert len(stored) > 1, "a long document is split into several passages"
    hit = job.store.bm25("Io Jupiter", 1)[0]
    assert hit.doc_id == "volcano"
    assert job.store.count() == 5 + len(stored)
    assert not job.store.bm25("magma chamber crust", 5) or all(
        "magma" not in h.text for h in job.store.bm25("magma chamber crust", 5)
    )


def test_other_embedding_model_is_refused(tmp_path: Path, embedder) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", corpus_records()[:2])
    IngestJob(settings_for(tmp_path), embedder=embedder).run([path], progress=False)
    store = MilvusStore(str(tmp_path / "w.db"), "winnow")
    with pytest.raises(SchemaMismatch, match="all-MiniLM-L6-v2"):
        store.ensure_collection(768, "BAAI/bge-base-en-v1.5")


def test_custom_field_names_and_csv(tmp_path: Path, embedder) -> None:
    path = tmp_path / "faq.csv"
    path.write_text("key,question,answer\n1,Refunds,Refunds are paid within 14 days.\n")
    job = IngestJob(settings_for(tmp_path), embedder=embedder)
    stats = job.run(
        [path], fields=FieldMap(id="key", text="answer", title="question"), progress=False
    )
    assert stats.documents == 1
    hit = job.store.bm25("refunds days", 1)[0]
    assert (hit.doc_id, hit.title) == ("1", "Refunds")


def test_nothing_ingested_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", str(bad), "--milvus-uri", str(tmp_path / "w.db"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "bad.jsonl:1" in proc.stderr and "nothing could be ingested" in proc.stderr


def test_kill_9_then_rerun_is_exact(tmp_path: Path, embedder) -> None:
    n = 1500
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
    ]
    recs = [
        {"_id": f"d{i}", "text": f"record {i} " + " ".join(words[(i + j) % 11] for j in range(12))}
        for i in range(n)
    ]
    path = write_jsonl(tmp_path / "big.jsonl", recs)
    db = tmp_path / "w.db"
    cmd = [
        sys.executable,
        "-m",
        "ingest",
        str(path),
        "--milvus-uri",
        str(db),
        "--batch-size",
        "64",
        "--log-level",
        "DEBUG",
    ]
    env = {**os.environ, "WINNOW_LOG_LEVEL": "DEBUG"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    writes = 0
    deadline = time.monotonic() + 240
    assert proc.stderr is not None
    for line in proc.stderr:
        writes += "wrote " in line
        if writes >= 3 or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert writes >= 3, "the job should have written some batches before the kill"
    time.sleep(1)
    job = IngestJob(Settings(milvus_uri=str(db), embed_device="cpu"), embedder=embedder)
    stats = job.run([path], progress=False)
    assert 0 < stats.unchanged < n, "some documents were stored before the kill, not all"
    assert job.store.count() == n
    assert sum(len(v) for v in job.store.ids_by_doc([f"d{i}" for i in range(n)]).values()) == n


def test_invalid_unicode_is_a_reported_skip(tmp_path: Path, embedder) -> None:
    """Lone surrogates (JSON escapes) in any field, undecodable bytes in a file or its name: each a
    skip naming the file and field, never a crash; the valid records around them are ingested."""
    root = tmp_path / "bad-unicode"
    (root / "docs").mkdir(parents=True)
    (root / "s.jsonl").write_text(
        '{"_id": "good", "text": "Glaciers are rivers of ice that move slowly downhill."}\n'
        '{"_id": "t", "text": "broken \\ud800 text"}\n'
        '{"_id": "i\\udfff", "text": "an id with a lone surrogate"}\n'
        '{"_id": "ti", "title": "\\udc00", "text": "a title with one"}\n'
        '{"_id": "m", "text": "metadata with one", "meta": {"lang": ["en", "\\ud83d"]}}\n'
    )
    (root / "docs" / "mixed.md").write_bytes(b"# Title\n\nvalid start \xff\xfe invalid bytes\n")
    (root / "rows.csv").write_bytes(b"id,text\nr1,fine row\nr2,bad \xc3\x28 byte\n")
    (root / "docs" / b"name-\xff.txt".decode("utf-8", "surrogateescape")).write_text("ok text")
    job = IngestJob(settings_for(tmp_path), embedder=embedder)
    stats = job.run([root], progress=False)
    reasons = [str(p) for p in stats.problems]
    joined = "\n".join(reasons)
    assert "s.jsonl:2: field text (character 7) is not valid Unicode" in joined, joined
    assert "s.jsonl:3: field _id" in joined and "s.jsonl:4: field title" in joined, joined
    assert "s.jsonl:5: field meta.lang[1]" in joined, joined
    assert any("mixed.md" in r and "UTF-8" in r for r in reasons), reasons
    assert any("rows.csv" in r and "UTF-8" in r for r in reasons), reasons
    assert any("name-\\xff.txt" in r and "file name" in r for r in reasons), reasons
    assert job.store.count() >= 1  # "good" (the CSV is cut where its decoder fails)
    ids = {h.doc_id for h in job.store.bm25("glaciers ice", 5)}
    assert "good" in ids
