"""Shared fixtures: real MiniLM (loaded once), a tiny random Qwen3 reranker, a milvus-lite server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.config import DEFAULT_EMBED_MODEL
from pipeline.embedding import Embedder

sys.path.insert(0, str(Path(__file__).parent))

from testkit.corpus import CORPUS, corpus_records, write_jsonl  # noqa: F401  (tests import them from here)
from testkit.servers import (  # noqa: F401
    LiveServer,
    MilvusServer,
    free_port,
    wait_healthy,
    wait_port,
)

# What makes a test's behaviour depend on ../shared: the tiny Qwen3 models take the real tokenizer
# when it is there (else a small BPE), and some tests read the tokenizer or SciFact directly.
SHARED_FIXTURES = frozenset({"tiny_reranker_dir"})  # tiny_engine and every app over it use this one
SHARED_NAMES = frozenset(
    {"build_tiny_reranker", "real_tokenizer_available", "load_real_tokenizer", "QWEN3_TOKENIZER",
     "SCIFACT", "SCIFACT_DIR", "TOKENIZER_DIR"}
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``uses_shared`` every test whose behaviour can change with ../shared, so CI can run them
    again with it hidden (``make test-no-shared``), as a user's clone has it."""
    for item in items:
        module = getattr(item, "module", None)
        names = set(vars(module)) if module is not None else set()
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())) or SHARED_NAMES & names:
            item.add_marker("uses_shared")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(DEFAULT_EMBED_MODEL, device="cpu").load()


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_qwen import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"), free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def tiny_engine(tiny_reranker_dir: Path):
    """One loaded fp32 HFEngine over the tiny Qwen3; apps wrap it in their own batcher."""
    from pipeline.rerank.backends.hf.engine import HFEngine

    engine = HFEngine(str(tiny_reranker_dir), device="cpu", dtype="float32")
    engine.load()
    return engine


def batched(engine, **kw):
    from pipeline.rerank.batcher import BatchedReranker, MicroBatcher

    return BatchedReranker(engine, "tiny-qwen3-reranker", MicroBatcher(engine, **kw))


@pytest.fixture(scope="session")
def sample_db(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Path:
    """A Milvus Lite file holding the CORPUS (ingested once per session; copy before writing)."""
    from ingest.job import IngestJob
    from pipeline.config import Settings

    root = tmp_path_factory.mktemp("sample-db")
    path = write_jsonl(root / "corpus.jsonl", corpus_records())
    job = IngestJob(Settings(milvus_uri=str(root / "w.db"), embed_device="cpu"), embedder=embedder)
    job.run([path], progress=False)
    job.store.close()
    return root / "w.db"
