"""MilvusStore against both paths: embedded Milvus Lite and a separate gRPC server process."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MilvusServer, free_port

from pipeline.domain import Passage, passage_id
from pipeline.store import MilvusStore, SchemaMismatch, StoreUnavailable

DIM = 8
ROOT = Path(__file__).resolve().parents[1]


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    v[(i + 1) % DIM] = 0.1
    return v / np.linalg.norm(v)


PASSAGES = [
    Passage("a", 0, "the quick brown fox jumps over the lazy dog", "Fox", {"lang": "en"}),
    Passage("a", 1, "foxes are small omnivorous mammals", "Fox", {"lang": "en"}),
    Passage("b", 0, "le renard brun saute par-dessus le chien", "Renard", {"lang": "fr"}),
    Passage("c", 0, "databases store rows in tables", 'Quote "title"', {"lang": "en"}),
]


def exercise(store: MilvusStore) -> None:
    store.ensure_collection(DIM, "test-model")
    vectors = np.stack([vec(i) for i in range(len(PASSAGES))])
    assert store.upsert(PASSAGES, vectors) == 4
    assert store.upsert(PASSAGES, vectors) == 4  # same ids: no duplicates
    store.flush()
    assert store.count() == 4
    hits = store.dense(vec(2), 2)
    assert hits[0].doc_id == "b" and hits[0].metadata == {"lang": "fr"}
    assert 0.99 < hits[0].score <= 1.0001
    assert store.dense(vec(2), 4, filter='metadata["lang"] == "en"')[0].doc_id != "b"
    bm = store.bm25("omnivorous foxes", 2)
    assert bm[0].id == PASSAGES[1].id and bm[0].score > 0, "BM25 scores are positive everywhere"
    hy = store.hybrid(vec(3), "databases tables", 3)
    assert hy[0].doc_id == "c" and hy[0].title == 'Quote "title"'
    assert store.ids_by_doc(["a", "zzz"]) == {"a": {PASSAGES[0].id, PASSAGES[1].id}, "zzz": set()}
    store.delete([PASSAGES[0].id])
    store.delete_docs(["c"])
    assert store.count() == 2
    with pytest.raises(SchemaMismatch, match="test-model"):
        store.ensure_collection(DIM + 1, "other-model")


def test_lite_file(tmp_path: Path) -> None:
    store = MilvusStore(str(tmp_path / "lite.db"), "t")
    exercise(store)
    store.close()
    reopened = MilvusStore(str(tmp_path / "lite.db"), "t")
    assert reopened.open() == ("test-model", DIM)
    assert reopened.count() == 2


def test_server_process(milvus_server: MilvusServer) -> None:
    store = MilvusStore(milvus_server.uri, "t_server", timeout=10)
    if store.exists():
        store.drop()
    exercise(store)
    assert store.ping()


def test_server_down_then_back(tmp_path: Path) -> None:
    server = MilvusServer(tmp_path / "srv", free_port())
    server.start()
    try:
        check_down_then_back(server)
    finally:
        server.kill()


def check_down_then_back(server: MilvusServer) -> None:
    store = MilvusStore(server.uri, "t", timeout=3)
    store.ensure_collection(DIM, "m")
    store.upsert(PASSAGES[:1], vec(0)[None, :])
    server.kill()
    assert not store.ping()
    with pytest.raises(StoreUnavailable):
        store.dense(vec(0), 1)
    server.start()
    deadline = time.monotonic() + 30
    while not store.ping() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.ping(), "the store reconnects by itself once Milvus is back"
    assert store.dense(vec(0), 1)[0].doc_id == "a"


def test_passage_id_is_stable_and_content_addressed() -> None:
    p = PASSAGES[0]
    assert p.id == passage_id("a", 0, p.text, "Fox", {"lang": "en"})
    assert p.id != Passage("a", 0, p.text + "!", "Fox", {"lang": "en"}).id
    assert len(p.id) == 40


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class CuttingProxy:
    """A loopback TCP proxy in front of Milvus that resets the connection under the next gRPC call.

    What a Milvus proxy restart, a load balancer or a server's GOAWAY (milvus-lite's gRPC server
    answers pymilvus' idle keepalive pings with ``too_many_pings``) does to a live connection. When
    armed, the next HTTP/2 HEADERS frame from the client (a call starting) is not forwarded: both
    sides of that connection are reset instead, so the call fails with gRPC UNAVAILABLE.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cuts = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        """Client → Milvus, frame by frame: the preface, then frames (9-byte header + payload)."""
        buf, preface = b"", True
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                return self._close(client, server, reset=False)
            buf += data
            while True:
                if preface:
                    size = len(PREFACE)
                elif len(buf) >= 9:
                    size = 9 + int.from_bytes(buf[:3], "big")
                    if buf[3] == 0x1 and self.armed.is_set():  # HEADERS: a call starts
                        self.armed.clear()
                        self.cuts += 1
                        return self._close(client, server, reset=True)
                else:
                    break
                if len(buf) < size:
                    break
                frame, buf, preface = buf[:size], buf[size:], False
                try:
                    server.sendall(frame)
                except OSError:
                    return self._close(client, server, reset=False)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        self._close(src, dst, reset=False)

    @staticmethod
    def _close(a: socket.socket, b: socket.socket, *, reset: bool) -> None:
        for s in (a, b):
            with contextlib.suppress(OSError):
                if reset:  # RST, not FIN: the peer sees the connection die mid-call
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.parametrize("when", ["connect", "call"])
def test_a_connection_reset_under_a_call_is_retried_once(
    milvus_server: MilvusServer, when: str
) -> None:
    """A connection that dies under a call (gRPC UNAVAILABLE) is replaced once, within the call's
    deadline, instead of failing the request: every store call is idempotent. ``connect``: the
    reset hits pymilvus' Connect handshake (how CI once failed, with milvus-lite's GOAWAY
    ``too_many_pings``); ``call``: it hits a search on a connection in use."""
    proxy = CuttingProxy(milvus_server.port)
    seed = MilvusStore(milvus_server.uri, f"t_reset_{when}", timeout=10)
    if seed.exists():
        seed.drop()
    seed.ensure_collection(DIM, "test-model")
    seed.upsert(PASSAGES, np.stack([vec(i) for i in range(len(PASSAGES))]))
    seed.flush()
    store = MilvusStore(proxy.uri, f"t_reset_{when}", timeout=10)
    try:
        if when == "call":
            assert store.open() == ("test-model", DIM)
            time.sleep(0.3)  # the connection is quiet
        proxy.armed.set()
        t0 = time.monotonic()
        if when == "connect":
            assert store.open() == ("test-model", DIM)
        assert store.dense(vec(2), 1)[0].doc_id == "b"
        assert proxy.cuts == 1, "the reset hit a call"
        assert time.monotonic() - t0 < 10
    finally:
        store.close()
        seed.drop()
        seed.close()
        proxy.close()


IDLE_SCRIPT = """
import sys, time
from pipeline.store import MilvusStore
path, who, idle_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
if who == "store":
    store = MilvusStore(path, "t_idle")
    store.ensure_collection(8, "m")
    store.count()
else:  # the control: a client with pymilvus' own gRPC options
    from pymilvus import MilvusClient
    MilvusClient(uri=path, dedicated=True).has_collection("t_idle")
print("IDLE FROM HERE", file=sys.stderr, flush=True)
time.sleep(idle_s)
"""


def ping_strikes(trace: str) -> int:
    """Pings Milvus Lite's gRPC server counted as abuse once the client went idle: received before
    the server's next allowed ping time (gRPC's own ping trace; a GOAWAY comes after the third)."""
    idle = trace.split("IDLE FROM HERE", 1)[1]
    found = re.findall(
        r"received ping \d+: now=@(\d+)ms .*?next_allowed_ping=@(\S+?)(?:ms)? ", idle
    )
    return sum(allowed != "-∞" and int(now) < int(allowed) for now, allowed in found)


@pytest.mark.slow
def test_an_idle_lite_store_sends_milvus_no_keepalive_pings(tmp_path: Path) -> None:
    """Milvus Lite serves its file over gRPC from a thread of the same process, with gRPC's default
    server policy: it counts keepalive pings on an idle connection as abuse and, after enough of
    them (~2 min with pymilvus' 10 s pings), resets the connection with GOAWAY ``too_many_pings``
    and gRPC prints an error line. The store sends it none; the control, a client with pymilvus'
    defaults idling beside it, does (read from gRPC's own ping trace of the server)."""
    env = {**os.environ, "GRPC_TRACE": "http_keepalive", "GRPC_VERBOSITY": "debug"}
    for who in ("store", "control"):
        (tmp_path / who).mkdir()
    procs = {
        who: subprocess.Popen(
            [sys.executable, "-c", IDLE_SCRIPT, str(tmp_path / who / "w.db"), who, "25"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for who in ("store", "control")
    }
    trace = {who: p.communicate(timeout=180)[1] for who, p in procs.items()}
    for who, p in procs.items():
        assert p.returncode == 0 and "IDLE FROM HERE" in trace[who], trace[who][-2000:]
    assert ping_strikes(trace["control"]) >= 1, "no strike for the control: a new trace format?"
    assert ping_strikes(trace["store"]) == 0
