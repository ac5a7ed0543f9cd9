"""``serve --workers N`` hands every setting, secrets included, to every worker process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import MilvusServer, free_port, wait_healthy

from pipeline.config import Settings

pytestmark = pytest.mark.slow


def test_to_env_rebuilds_the_same_settings_secrets_included(monkeypatch) -> None:
    s = Settings(api_key="k-123", milvus_token="root:Milvus", rerank=False, top_k=7)
    env = s.to_env()
    assert env["WINNOW_API_KEY"] == "k-123" and env["WINNOW_MILVUS_TOKEN"] == "root:Milvus"
    for k in list(os.environ):
        if k.startswith("WINNOW_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert Settings() == s


def test_api_key_given_as_flag_guards_every_worker(milvus_server: MilvusServer, tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINNOW_")}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pipeline", "serve", "--workers", "2", "--port", str(port)),
            *("--api-key", "sekrit", "--milvus-uri", milvus_server.uri, "--no-rerank"),
            *("--embed-device", "cpu", "--collection", "workers_auth"),
        ],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, proc)
        # several connections so that both workers answer at least once
        for _ in range(12):
            with httpx.Client(timeout=30) as c:
                r = c.post(f"{url}/v1/search", json={"query": "tides"})
                assert r.status_code == 401, r.text
                r = c.post(
                    f"{url}/v1/search",
                    json={"query": "tides"},
                    headers={"Authorization": "Bearer sekrit"},
                )
                assert r.status_code != 401, r.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
