"""CPU-aware defaults (issue 30 item 1): the hf reranker on a CPU gets a search budget and a pair
length a CPU can meet; what a user sets, and every other machine, is left alone."""

from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.runtime import CPU_RERANK_MAX_LENGTH, CPU_SEARCH_RERANK_BUDGET_MS, machine_defaults

DEFAULT_MAX_LENGTH = Settings.model_fields["reranker"].default_factory().rerank_max_length  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WINNOW_RERANK_MAX_LENGTH", "WINNOW_SEARCH_RERANK_BUDGET_MS", "WINNOW_RERANK"):
        monkeypatch.delenv(name, raising=False)


def test_hf_on_a_cpu_gets_the_cpu_defaults() -> None:
    got = machine_defaults(Settings(rerank_backend="hf", rerank_device="cpu"))
    assert got.rerank_max_length == CPU_RERANK_MAX_LENGTH < DEFAULT_MAX_LENGTH
    assert got.search_rerank_budget_ms == CPU_SEARCH_RERANK_BUDGET_MS
    assert machine_defaults(got) == got  # idempotent: applied by create_app and by Runtime


def test_what_the_user_sets_wins_from_kwargs_and_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got = machine_defaults(
        Settings(rerank_backend="hf", rerank_device="cpu", rerank_max_length=8192)
    )
    assert got.rerank_max_length == 8192
    assert got.search_rerank_budget_ms == CPU_SEARCH_RERANK_BUDGET_MS
    monkeypatch.setenv("WINNOW_SEARCH_RERANK_BUDGET_MS", "0")  # 0 = the deadline, said explicitly
    got = machine_defaults(Settings(rerank_backend="hf", rerank_device="cpu"))
    assert got.search_rerank_budget_ms == 0
    assert got.rerank_max_length == CPU_RERANK_MAX_LENGTH


@pytest.mark.parametrize(
    "kw",
    [
        {"rerank_backend": "hf", "rerank_device": "cuda"},
        {"rerank_backend": "remote", "rerank_url": "http://127.0.0.1:9"},
        {"rerank": False},
    ],
)
def test_other_machines_keep_the_defaults(kw: dict[str, object]) -> None:
    settings = Settings(**kw)
    assert machine_defaults(settings) is settings


def test_the_runtime_applies_them(tmp_path: object) -> None:
    from pipeline.runtime import Runtime
    from testkit.memory_store import MemoryStore

    rt = Runtime(
        Settings(rerank_backend="hf", rerank_device="cpu"), embedder=object(), store=MemoryStore()
    )  # type: ignore[arg-type]
    assert rt.settings.rerank_max_length == CPU_RERANK_MAX_LENGTH
