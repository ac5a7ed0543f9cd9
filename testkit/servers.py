"""Real servers for tests and benchmarks: uvicorn in a thread, a ``milvus-lite server`` process,
and the port/health waits they need."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, drawn from below the kernel's ephemeral range.

    ``bind(0)`` hands out ephemeral ports, the same pool every outgoing connection and every
    ``bind(0)`` in a child (vLLM's engine core picks its own that way) draws from; between our
    pick and the server's bind one of them took the port (CI, stop 37: ``[Errno 98]``). Ports
    below the range are only ever taken by an explicit bind.
    """
    import random

    low = min(_ephemeral_low(), 65536)
    if low > 20000:
        for port in random.sample(range(20000, low), 64):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
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
