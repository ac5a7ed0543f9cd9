"""One collection/model rule, one message: the API, ``python -m pipeline search`` and the evaluator."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import LiveServer
from test_eval import make_dataset

from pipeline.__main__ import main
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.runtime import open_store

pytestmark = pytest.mark.slow

OTHER_MODEL = "someone/other-embedder"


def foreign_collection(db: Path, collection: str) -> str:
    """A collection recorded as built by another embedding model (same dimension)."""
    settings = Settings(milvus_uri=str(db), collection=collection)
    store = open_store(settings)
    store.ensure_collection(384, OTHER_MODEL)
    store.close()
    return f"collection {collection!r} was built with embedding model {OTHER_MODEL!r}"


def test_api_cli_and_eval_refuse_another_models_collection(
    tmp_path: Path, embedder, capsys
) -> None:
    db = tmp_path / "w.db"
    start = foreign_collection(db, "foreign")
    settings = Settings(milvus_uri=str(db), collection="foreign", embed_device="cpu", rerank=False)
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        r = httpx.post(f"{server.url}/v1/search", json={"query": "tides"}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["type"] == "collection_mismatch"
    api_message = r.json()["error"]["message"]
    assert api_message.startswith(start)

    flags = ["--milvus-uri", str(db), "--embed-device", "cpu", "--no-rerank"]
    assert main(["search", "tides", "--collection", "foreign", *flags]) == 1
    assert " ".join(api_message.split()) in " ".join(capsys.readouterr().err.split())

    data = make_dataset(tmp_path / "beir")
    foreign_collection(db, "foreign_eval")
    code = main(["eval", str(data), "--skip-ingest", "--collection", "foreign_eval", "-q", *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert " ".join(api_message.replace("'foreign'", "'foreign_eval'").split()) in err
