"""What a new user meets first: settings that say what is wrong, passages cut between words, honest
ingest figures, advice that fits the route (issue: a fresh clone is green and self-contained)."""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.chunking import Chunker
from ingest.job import IngestStats, summary_table
from ingest.sources import Document
from pipeline.config import SettingsError, settings_from_args, unknown_env, warn_unknown_env
from pipeline.errors import RerankDisabled

ROOT = Path(__file__).resolve().parents[1]


def test_a_misspelt_setting_is_named_with_the_closest_real_one() -> None:
    env = {
        "WINNOW_TOPK": "5",
        "WINNOW_MILVUS_URL": "http://x",
        "WINNOW_TOP_K": "50",  # real: not reported
        "WINNOW_REQUIRE_VLLM": "1",  # the project's own tooling: not reported
        "WINNOW_QQQQQQQQ": "1",
        "PATH": "/bin",
    }
    assert unknown_env(env) == [
        ("WINNOW_MILVUS_URL", "WINNOW_MILVUS_URI"),
        ("WINNOW_QQQQQQQQ", None),
        ("WINNOW_TOPK", "WINNOW_TOP_K"),
    ]


def test_the_warning_is_logged_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WINNOW_TOPK", "5")
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        warn_unknown_env()
    assert "WINNOW_TOPK is not a Winnow setting and is ignored; did you mean WINNOW_TOP_K?" in (
        caplog.text
    )


def test_the_cli_warns_about_a_misspelt_setting(tmp_path: Path) -> None:
    """Through a real process, as a user sees it: stderr names the variable and the fix."""
    env = {"WINNOW_TOPK": "5", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "search", "x", "--no-rerank", "--milvus-uri",
         str(tmp_path / "none.db")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "did you mean WINNOW_TOP_K?" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(("size", "overlap"), [(16, 64), (16, 16), (256, 300)])
def test_an_overlap_not_below_the_passage_size_is_refused(size: int, overlap: int) -> None:
    import argparse

    ns = argparse.Namespace(setting_chunk_tokens=size, setting_chunk_overlap=overlap)
    with pytest.raises(SettingsError, match=r"WINNOW_CHUNK_OVERLAP .* must be below"):
        settings_from_args(ns)


def _words_cut(text: str, passages: list[str]) -> list[str]:
    """Passages that start or end inside a word of ``text``."""
    bad = []
    for p in passages:
        at = text.find(p)
        assert at >= 0, p
        end = at + len(p)
        if at > 0 and not text[at - 1].isspace():
            bad.append(f"starts mid-word: {p[:30]!r}")
        if end < len(text) and not text[end].isspace() and text[end - 1].isalnum():
            bad.append(f"ends mid-word: {p[-30:]!r}")
    return bad


@pytest.mark.parametrize(("size", "overlap"), [(16, 12), (24, 8), (32, 0), (64, 40)])
def test_passages_start_and_end_between_words(embedder, size: int, overlap: int) -> None:
    """Overlaps as given (never silently halved) and both cuts between words."""
    text = (
        "Photosynthesis transforms electromagnetic radiation into biochemical energy "
        "through chlorophyll-mediated reactions; unquestionably, microorganisms "
        "characteristically outnumber multicellular organisms everywhere. "
    ) * 6
    chunker = Chunker(embedder.tokenizer, size, overlap)
    passages = [p.text for p in chunker.split(Document(id="d", text=text, title=""))]
    assert len(passages) > 3
    assert _words_cut(text, passages) == []
    if overlap:  # consecutive passages share text, about `overlap` tokens of it
        shared = [a[-40:].split()[-1] in b for a, b in itertools.pairwise(passages)]
        assert all(shared), passages


def test_ingest_summary_keeps_the_model_load_out_of_the_rate() -> None:
    stats = IngestStats(
        documents=3, passages=12, embedded=12, seconds=18.0, load_s=17.0, embed_s=0.5
    )
    assert stats.passages_per_s == pytest.approx(12.0)
    table = summary_table(stats)
    assert re.search(r"model load \(s\)\s+│?\s*17\.0", table), table
    assert re.search(r"passages/s \(after load\)\s+│?\s*12\.0", table), table
    assert re.search(r"passages/s \(embedding only\)\s+│?\s*24\.0", table), table


def test_rerank_disabled_advice_fits_the_route() -> None:
    assert "search with rerank=false" in RerankDisabled("search").message
    advice = RerankDisabled("rerank").message
    assert advice.count("rerank=false") == 1 and "only reranks" in advice and "/v1/search" in advice
