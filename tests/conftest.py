"""Shared fixtures: real MiniLM (loaded once), a tiny random Qwen3 reranker, a milvus-lite server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.config import DEFAULT_EMBED_MODEL
from pipeline.embedding import Embedder

sys.path.insert(0, str(Path(__file__).parent))

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


CORPUS = {
    "photosynthesis": (
        "Photosynthesis",
        "Plants use chlorophyll in their leaves to turn sunlight, water and carbon dioxide into "
        "glucose and oxygen. This process is called photosynthesis.",
    ),
    "volcano": (
        "Volcanoes",
        "A volcano is a rupture in the crust of a planet where molten lava, ash and gases escape "
        "from a magma chamber below the surface.",
    ),
    "python": (
        "Python language",
        "Python is a high-level programming language known for readable syntax; it is used for "
        "web development, data science and scripting.",
    ),
    "marathon": (
        "Marathon running",
        "The marathon is a long-distance foot race of 42.195 kilometres, commemorating the run "
        "of the Greek messenger from Marathon to Athens.",
    ),
    "coffee": (
        "Coffee",
        "Coffee is brewed from roasted coffee beans, the seeds of berries from Coffea plants; "
        "caffeine makes it a stimulant.",
    ),
    "tides": (
        "Ocean tides",
        "Tides are the rise and fall of sea levels caused by the gravitational pull of the moon "
        "and the sun on the Earth's oceans.",
    ),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def corpus_records() -> list[dict]:
    return [{"_id": k, "title": t, "text": x, "metadata": {}} for k, (t, x) in CORPUS.items()]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(DEFAULT_EMBED_MODEL, device="cpu").load()


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_qwen import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-qwen3"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url``/health until 200; fail early with its stderr when ``proc`` has exited."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr is not None else ""
            raise RuntimeError(f"server exited: {err}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/health did not answer within {timeout:g} s")
        time.sleep(0.2)


class MilvusServer:
    """A ``milvus-lite server`` process: the same gRPC path a Milvus standalone/cluster uses."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
        self.proc = subprocess.Popen(
            [
                exe,
                "server",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: kill() takes any children with it
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, like a crash: nothing is flushed or shut down cleanly."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"), free_port())
    server.start()
    yield server
    server.kill()


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread.

    It runs with the app's own HTTP settings (header deadline, keep-alive, concurrency), as ``serve`` does.
    ``port``: a given one, to restart a server where its clients expect it.
    """

    def __init__(self, app: object, port: int | None = None) -> None:
        import uvicorn

        from pipeline.api.server import uvicorn_options

        self.port = port if port is not None else free_port()
        state = getattr(getattr(app, "state", None), "winnow", None)
        options = uvicorn_options(state.settings) if state is not None else {}
        options.update(host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def tiny_engine(tiny_reranker_dir: Path):
    """One loaded fp32 HFEngine over the tiny Qwen3; apps wrap it in their own batcher."""
    from pipeline.rerank.hf import HFEngine

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
