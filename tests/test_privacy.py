"""/metrics behind its key, /ready without file paths, the score cache partitioned per API key
(issue 27 item 5), over real HTTP with the tiny Qwen3 reranker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, batched
from test_api import app_settings, copy_db

from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.rerank.factory import with_cache

pytestmark = pytest.mark.slow

K1, K2, METRICS_KEY = "key-one", "key-two", "scrape-me"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def serve(tmp: Path, sample_db: Path, embedder, tiny_engine, tiny_dir: Path, **kw) -> LiveServer:
    s = app_settings(copy_db(sample_db, tmp), rerank_model=str(tiny_dir), **kw)
    reranker = with_cache(batched(tiny_engine), s.reranker)
    reranker.model = s.rerank_model  # as build_reranker names it: the local directory
    return LiveServer(create_app(s, embedder=embedder, reranker=reranker))


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory, sample_db, embedder, tiny_engine, tiny_reranker_dir
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("privacy")
    with serve(
        tmp,
        sample_db,
        embedder,
        tiny_engine,
        tiny_reranker_dir,
        api_key=f"{K1}, {K2}",
        metrics_api_key=METRICS_KEY,
    ) as server:
        yield server


def cache_hits(server: LiveServer) -> int:
    text = httpx.get(f"{server.url}/metrics", headers=bearer(METRICS_KEY), timeout=60).text
    line = next(x for x in text.splitlines() if x.startswith("winnow_rerank_cache_hits_total"))
    return int(float(line.split()[-1]))


def test_metrics_needs_the_metrics_key(keyed: LiveServer) -> None:
    assert httpx.get(f"{keyed.url}/metrics", timeout=60).status_code == 401
    api = httpx.get(
        f"{keyed.url}/metrics", headers=bearer(K1), timeout=60
    )  # the API key is not enough
    assert api.status_code == 401 and "WINNOW_METRICS_API_KEY" in api.json()["error"]["message"]
    ok = httpx.get(f"{keyed.url}/metrics", headers=bearer(METRICS_KEY), timeout=60)
    assert ok.status_code == 200 and "winnow_rerank_cache_hits_total" in ok.text
    # and the metrics key opens nothing else
    r = httpx.post(
        f"{keyed.url}/v1/rerank",
        json={"query": "q", "documents": ["d"]},
        headers=bearer(METRICS_KEY),
        timeout=60,
    )
    assert r.status_code == 401
    assert httpx.get(f"{keyed.url}/health", timeout=60).status_code == 200


def test_ready_shows_paths_only_with_a_key(keyed: LiveServer, tiny_reranker_dir: Path) -> None:
    anonymous = httpx.get(f"{keyed.url}/ready", timeout=60)
    assert anonymous.status_code == 200
    assert (
        str(tiny_reranker_dir) not in anonymous.text and "/" not in anonymous.json()["rerank_model"]
    )
    assert anonymous.json()["rerank_model"] == tiny_reranker_dir.name
    assert httpx.get(f"{keyed.url}/ready", headers=bearer("wrong"), timeout=60).json()[
        "rerank_model"
    ] == (tiny_reranker_dir.name)
    for key in (K1, METRICS_KEY):
        full = httpx.get(f"{keyed.url}/ready", headers=bearer(key), timeout=60).json()
        assert full["rerank_model"] == str(tiny_reranker_dir)


def test_a_hit_for_one_key_is_a_miss_for_another(keyed: LiveServer) -> None:
    body = {"query": "who asked about tides?", "documents": ["the moon pulls the sea", "coffee"]}
    url = f"{keyed.url}/v1/rerank"
    first = httpx.post(url, json=body, headers=bearer(K1), timeout=60)
    assert first.status_code == 200
    hits = cache_hits(keyed)
    again = httpx.post(url, json=body, headers=bearer(K1), timeout=60)
    assert again.json()["results"] == first.json()["results"]
    assert cache_hits(keyed) == hits + 2  # the same key: both pairs from the cache
    other = httpx.post(url, json=body, headers=bearer(K2), timeout=60)
    assert other.json()["results"] == first.json()["results"]  # same scores, computed afresh
    assert cache_hits(keyed) == hits + 2  # another key: no hit, nothing learnt about K1's query


def test_shared_scope_and_open_metrics_rules(
    tmp_path: Path, sample_db, embedder, tiny_engine, tiny_reranker_dir
) -> None:
    with serve(
        tmp_path / "a",
        sample_db,
        embedder,
        tiny_engine,
        tiny_reranker_dir,
        api_key=f"{K1},{K2}",
        rerank_cache_scope="shared",
    ) as server:
        # no metrics key: the API keys open /metrics
        assert httpx.get(f"{server.url}/metrics", timeout=60).status_code == 401
        text = lambda: httpx.get(f"{server.url}/metrics", headers=bearer(K2), timeout=60).text  # noqa: E731
        assert "winnow_rerank_cache_hits_total 0.0" in text()
        body = {"query": "shared cache", "documents": ["a", "b", "c"]}
        httpx.post(f"{server.url}/v1/rerank", json=body, headers=bearer(K1), timeout=60)
        httpx.post(f"{server.url}/v1/rerank", json=body, headers=bearer(K2), timeout=60)
        assert "winnow_rerank_cache_hits_total 3.0" in text()  # one tenant: K2 hits K1's pairs
    with serve(tmp_path / "b", sample_db, embedder, tiny_engine, tiny_reranker_dir) as server:
        assert (
            httpx.get(f"{server.url}/metrics", timeout=60).status_code == 200
        )  # no key at all: open


def test_blank_keys_are_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="WINNOW_API_KEY holds no key"):
        Settings(api_key=" , ")
    assert Settings(api_key="a, b ,c").api_keys == ["a", "b", "c"]
    assert Settings(api_key="a").metrics_keys == ["a"]
    assert Settings(api_key="a", metrics_api_key="m").metrics_keys == ["m"]
    assert Settings().metrics_keys == []
