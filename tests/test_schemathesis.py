"""The OpenAPI schema against the running service: schemathesis with every check, over real HTTP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LiveServer, batched
from test_api import app_settings, copy_db

from pipeline.api import create_app

pytestmark = pytest.mark.slow
HERE = str(Path(__file__).parent)

# CI runs a bounded sample; a release check runs more: WINNOW_SCHEMATHESIS_EXAMPLES=300 (≈1,800 cases).
EXAMPLES = int(os.environ.get("WINNOW_SCHEMATHESIS_EXAMPLES", "40"))


def test_schemathesis_all_checks(tmp_path: Path, sample_db, embedder, tiny_engine) -> None:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    settings = app_settings(
        copy_db(sample_db, tmp_path),
        api_key="st-key",
        write_api_key="st-key",  # the write routes are fuzzed too
        max_documents=40,
        max_top_k=200,
    )
    app = create_app(settings, embedder=embedder, reranker=batched(tiny_engine))
    with LiveServer(app) as server:
        proc = subprocess.run(
            [
                *(exe, "--config-file", f"{HERE}/schemathesis.toml", "run"),
                *(f"{server.url}/openapi.json", "--checks", "all"),
                # POST /v1/documents answers 200 with a result per document: a rejected one (empty
                # text, …) is, correctly, not found afterwards; this check infers "created" from
                # the 200 alone (and the config file cannot turn off a check --checks names)
                *("--exclude-checks", "ensure_resource_availability"),
                *("--max-examples", str(EXAMPLES), "--seed", "7", "--request-timeout", "60"),
                *("-H", "Authorization: Bearer st-key", "--no-color"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": HERE},
        )
    out = proc.stdout + proc.stderr
    (tmp_path / "schemathesis.log").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", out))
    assert cases >= 4 * EXAMPLES or "passed" in out, out[-3000:]
