"""The Ray engine on a real local Ray (2 CPUs), real MiniLM, Milvus Lite and a milvus-lite server.

Covers both write paths: Milvus Lite (the driver writes; a Lite file is one process) and a Milvus
server URI (the actors write), and the guarantees of the single-process job: same ids and texts,
reruns embed nothing, a changed document's stale passages go, problems reported with file:line, a
driver killed with SIGKILL then rerun gives the exact result, another embedding model is refused
before Ray starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus_records, write_jsonl

from ingest.job import IngestJob
from pipeline.config import Settings
from pipeline.store import MilvusStore, SchemaMismatch, in_list
from testkit.shared_dir import SCIFACT as SCIFACT_DIR

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = SCIFACT_DIR / "corpus.jsonl"


def test_no_ray_needed_for_import_and_default_job(tmp_path: Path) -> None:
    """Without Ray: imports and the default engine work; ``--engine ray`` fails with the hint."""
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_records()[:2])
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["ray"] = None  # import ray -> ImportError, as when it is not installed
        import pipeline, ingest, ingest.job, ingest.ray_engine
        from ingest.__main__ import main
        assert sys.modules["ray"] is None
        rc = main([{str(corpus)!r}, "--engine", "ray", "--milvus-uri", {str(tmp_path / "r.db")!r}])
        assert rc == 2, rc
        rc = main([{str(corpus)!r}, "--milvus-uri", {str(tmp_path / "s.db")!r}, "-q"])
        assert rc == 0, rc
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
    assert "pip install 'winnow[ray]'" in proc.stderr


ray = pytest.importorskip("ray")

from ingest.ray_engine import RayIngestJob, start_ray  # noqa: E402


def test_a_local_ray_that_times_out_starting_is_started_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's own error when its node does not come up in 30 s: one more start, then it is used;
    any other error, or a second timeout, is raised (no real Ray started here)."""
    import ingest.ray_engine as engine

    calls: list[dict] = []
    stuck = Exception("The current node timed out during startup. This could happen because ...")

    def fake_init(**kw: object) -> None:
        calls.append(kw)
        if len(calls) == 1:
            raise stuck

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert engine.start_ray(Settings()) is True and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), (_ for _ in ()).throw(stuck)))
    with pytest.raises(Exception, match="timed out during startup"):
        engine.start_ray(Settings())
    assert len(calls) == engine.LOCAL_START_TRIES
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        engine.start_ray(Settings())
    assert len(calls) == 1


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module (what ``--engine ray`` without an address starts)."""
    started = start_ray(Settings())
    yield
    if started:
        ray.shutdown()


def ray_settings(uri: str, **kw) -> Settings:
    return Settings(milvus_uri=uri, embed_device="cpu", ingest_engine="ray", **kw)


@pytest.mark.slow
def test_refused_before_ray_starts(tmp_path: Path, embedder) -> None:
    db = str(tmp_path / "w.db")
    MilvusStore(db, "winnow").ensure_collection(384, "BAAI/other-model")
    path = write_jsonl(tmp_path / "c.jsonl", corpus_records())
    job = RayIngestJob(ray_settings(db), embedder=embedder)
    with pytest.raises(SchemaMismatch, match="BAAI/other-model"):
        job.run([path], progress=False)
    assert job.ray_started is False
    assert job.store.count() == 0


@pytest.mark.slow
def test_lite_problems_change_and_rerun(tmp_path: Path, embedder, local_ray) -> None:
    """Milvus Lite: the driver writes what the actors embedded; the same problems as single."""
    from test_ingest import make_corpus_dir

    corpus = make_corpus_dir(tmp_path / "corpus")
    s = ray_settings(str(tmp_path / "w.db"))
    job = RayIngestJob(s, embedder=embedder)
    stats = job.run([corpus], progress=False)
    assert (stats.documents, stats.files, stats.embedded) == (7, 6, 7)
    reasons = {str(p) for p in stats.problems}
    assert any("bad.jsonl:2" in r and "malformed JSON" in r for r in reasons), reasons
    assert any("bad.jsonl:3" in r and "no text field" in r for r in reasons), reasons
    assert any("bad.jsonl:4" in r and "empty text" in r for r in reasons), reasons
    assert any("latin1.txt" in r and "UTF-8" in r for r in reasons), reasons
    q = embedder.embed(["which gas do plants release when they make sugar?"], query=True)[0]
    assert job.store.dense(q, 1)[0].doc_id == "photosynthesis"

    recs = corpus_records()[:3]
    recs[1]["text"] = "Completely new text: volcanic eruptions on Io, a moon of Jupiter. " * 30
    write_jsonl(corpus / "corpus.jsonl", recs)
    changed = RayIngestJob(s, embedder=embedder).run([corpus], progress=False)
    assert changed.unchanged == 6 and changed.deleted == 1 and changed.embedded > 1
    stored = job.store.ids_by_doc(["volcano"])["volcano"]
    assert len(stored) == changed.embedded
    assert job.store.count() == 6 + len(stored)
    assert all("magma" not in h.text for h in job.store.bm25("magma chamber crust", 5))


def rows(store: MilvusStore, ids: list[str]) -> dict[str, dict]:
    fields = ["doc_id", "chunk", "title", "text", "metadata", "dense"]
    out: dict[str, dict] = {}
    for i in range(0, len(ids), 200):
        part = ids[i : i + 200]
        got = store.conn.call(
            lambda c, left, part=part: c.query(
                store.collection, filter=in_list("id", part), output_fields=fields, timeout=left()
            )
        )
        out.update({r["id"]: r for r in got})
    return out


@pytest.mark.slow
def test_scifact_same_ids_as_single_kill9_rerun(
    tmp_path: Path, embedder, milvus_server, local_ray
) -> None:
    """≥ 300 SciFact documents: single-process job (Lite) vs Ray engine with the actors writing
    to a Milvus server; the Ray driver is killed with SIGKILL mid-run, then rerun twice."""
    if not SCIFACT.exists():
        pytest.skip(f"{SCIFACT} not present")
    n = 300
    with SCIFACT.open() as fh:
        lines = [next(fh) for _ in range(n)]
    corpus = tmp_path / "scifact300.jsonl"
    corpus.write_text("".join(lines))
    doc_ids = [json.loads(x)["_id"] for x in lines]

    single = IngestJob(
        Settings(milvus_uri=str(tmp_path / "single.db"), embed_device="cpu", ingest_batch_size=64),
        embedder=embedder,
    )
    want = single.run([corpus], progress=False)
    assert want.documents == n and want.embedded == want.passages > n

    collection = f"ray_scifact_{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "ingest",
        str(corpus),
        "--engine",
        "ray",
        "--milvus-uri",
        milvus_server.uri,
        "--collection",
        collection,
        "--batch-size",
        "64",
        "--embed-device",
        "cpu",
        "--log-level",
        "DEBUG",
    ]
    log_path = tmp_path / "driver.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    # progress read from Milvus itself (the actors write there), not from Ray's forwarded logs
    watcher = MilvusStore(milvus_server.uri, collection, timeout=10)
    written, deadline = 0, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if watcher.exists():
            written = watcher.count()
            if written >= 2 * 64:  # two batches of 64 documents hold at least this many passages
                break
        time.sleep(0.2)
    exited = proc.poll()
    os.kill(proc.pid, signal.SIGKILL)  # the driver only
    proc.wait(30)
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):  # tidy up Ray helpers the driver left behind
        os.killpg(proc.pid, signal.SIGKILL)
    watcher.close()
    assert written > 0 and exited is None, (
        f"the Ray job should have written some batches, not all, before the kill ({written} "
        f"passages written, driver exit code {exited}); its log ended:\n"
        + log_path.read_text(errors="replace")[-4000:]
    )

    s = ray_settings(milvus_server.uri, collection=collection, ingest_batch_size=64)
    resumed = RayIngestJob(s, embedder=embedder).run([corpus], progress=False)
    assert 0 < resumed.unchanged < n, "some documents were stored before the kill, not all"
    assert 0 < resumed.embedded < want.embedded
    again = RayIngestJob(s, embedder=embedder)
    rerun = again.run([corpus], progress=False)
    assert rerun.embedded == 0 and rerun.unchanged == n and rerun.deleted == 0

    got_ids = again.store.ids_by_doc(doc_ids)
    want_ids = single.store.ids_by_doc(doc_ids)
    assert got_ids == want_ids
    assert again.store.count() == single.store.count() == want.passages
    all_ids = sorted(set().union(*want_ids.values()))
    a, b = rows(single.store, all_ids), rows(again.store, all_ids)
    for pid in all_ids:
        for f in ("doc_id", "chunk", "title", "text", "metadata"):
            assert a[pid][f] == b[pid][f], (pid, f)
    va = np.array([a[p]["dense"] for p in all_ids], dtype=np.float32)
    vb = np.array([b[p]["dense"] for p in all_ids], dtype=np.float32)
    assert float(np.min(np.sum(va * vb, axis=1))) > 0.999  # same model, other batch shapes
