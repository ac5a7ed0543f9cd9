"""Benchmark: Winnow's promises under pressure (issue 27), against a real ``python -m pipeline serve``.

Scenarios (each against a fresh server process on loopback, rerank off, a ``milvus-lite server``):

- ``freeze``: SIGSTOP Milvus, send ``--burst`` concurrent ``/v1/search`` on fresh connections, report
  the status codes and how long each waited (against ``WINNOW_MILVUS_TIMEOUT``), then SIGCONT and
  report how long until a search answers 200 again.
- ``idle``: hold ``--idle`` TCP connections that send nothing, then time ``/health`` (50 probes)
  and one ``/v1/search`` while they are held.

    .venv/bin/python bench/pressure.py --scenario freeze --burst 100 --milvus-timeout 10
    .venv/bin/python bench/pressure.py --scenario idle --idle 1100

Never run as a test. Every process it starts listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.servers import free_port  # noqa: E402

DOCS = [
    {
        "_id": "photosynthesis",
        "title": "Photosynthesis",
        "text": "Plants turn sunlight into sugar.",
    },
    {"_id": "volcano", "title": "Volcanoes", "text": "Lava and ash escape from a magma chamber."},
    {"_id": "tides", "title": "Tides", "text": "The moon's pull raises and lowers the seas."},
]
BODY = {"query": "how do plants make sugar", "top_n": 3, "rerank": False}


def wait_http(url: str, within: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer 200 within {within}s")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def milvus(data: Path, port: int) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
    argv = [exe, "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)]
    return process(argv, dict(os.environ))


async def burst(url: str, n: int) -> list[tuple[int, float]]:
    import httpx

    start = asyncio.Event()

    async def one() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await start.wait()
            t0 = time.monotonic()
            r = await client.post("/v1/search", json=BODY)
            return r.status_code, time.monotonic() - t0

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(0.3)
    start.set()
    return await asyncio.gather(*tasks)


def summary(results: list[tuple[int, float]]) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    times = sorted(t for _, t in results)
    return {
        "codes": codes,
        "median_s": round(times[len(times) // 2], 3),
        "p95_s": round(times[int(0.95 * (len(times) - 1))], 3),
        "max_s": round(times[-1], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["freeze", "idle"], required=True)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--idle", type=int, default=1100)
    ap.add_argument("--milvus-timeout", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * args.idle + 1024)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="winnow-pressure-"))
    mport, wport = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WINNOW_MILVUS_URI": f"http://127.0.0.1:{mport}",
        "WINNOW_COLLECTION": "pressure",
        "WINNOW_MILVUS_TIMEOUT": str(args.milvus_timeout),
        "WINNOW_RERANK": "off",
        "WINNOW_EMBED_DEVICE": "cpu",
        "WINNOW_LOG_LEVEL": "ERROR",
    }
    corpus = tmp / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out: dict[str, Any] = {"scenario": args.scenario, "milvus_timeout_s": args.milvus_timeout}
    try:
        with milvus(tmp / "milvus", mport) as mil:
            subprocess.run([sys.executable, "-m", "ingest", str(corpus), "-q"], env=env, check=True)
            serve = [sys.executable, "-m", "pipeline", "serve", "--port", str(wport)]
            with process(serve, env):
                url = f"http://127.0.0.1:{wport}"
                wait_http(f"{url}/ready")
                if args.scenario == "freeze":
                    out["healthy"] = summary(asyncio.run(burst(url, args.burst)))
                    os.killpg(mil.pid, signal.SIGSTOP)
                    try:
                        out["frozen"] = summary(asyncio.run(burst(url, args.burst)))
                        out["frozen_again"] = summary(asyncio.run(burst(url, 20)))
                    finally:
                        os.killpg(mil.pid, signal.SIGCONT)
                    import httpx

                    t0 = time.monotonic()
                    while httpx.post(f"{url}/v1/search", json=BODY, timeout=60).status_code != 200:
                        time.sleep(0.05)
                    out["recovered_after_sigcont_s"] = round(time.monotonic() - t0, 3)
                else:
                    out.update(idle(url, wport, args.idle))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def idle(url: str, port: int, n: int) -> dict[str, Any]:
    import httpx

    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        time.sleep(1.0)  # the server has accepted them all
        times, codes = [], set()
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(50):
                t0 = time.monotonic()
                codes.add(http.get("/health").status_code)
                times.append(time.monotonic() - t0)
            t0 = time.monotonic()
            search = http.post("/v1/search", json=BODY).status_code
            search_s = time.monotonic() - t0
        times.sort()
        still_open = sum(1 for s in socks if _open(s))
    finally:
        for s in socks:
            s.close()
    return {
        "idle_sockets": n,
        "idle_still_open": still_open,
        "health_codes": sorted(codes),
        "health_median_ms": round(times[len(times) // 2] * 1000, 2),
        "health_max_ms": round(times[-1] * 1000, 2),
        "search_status": search,
        "search_ms": round(search_s * 1000, 1),
    }


def _open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
