"""The cross-lingual example (examples/crosslingual) and the parts of Chinese support that can be proven.

No multilingual embedder and no Qwen3-Reranker weights are available offline, so these tests prove
what the shipped stack does and the pieces a multilingual setup relies on:

- the example runs end to end (real MiniLM, Milvus Lite, jieba BM25): English questions and Chinese
  questions around a Latin-script term find their English document; plain Chinese questions get
  nothing from BM25 (no shared words) — whether they are found is the embedder's business;
- the jieba analyzer segments Chinese words for BM25, where Lite's standard analyzer cannot;
- a Chinese query reaches the reranker unchanged through SearchService, and the Qwen3 prompt carries
  it exactly: the card's string, the card's token ids, the card's scores (tiny random Qwen3).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.domain import Passage
from pipeline.rerank import prompt
from pipeline.rerank.base import Reranker, Sample
from pipeline.store import MilvusStore
from testkit.tiny_qwen import load_real_tokenizer, real_tokenizer_available

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "crosslingual"


def _load_example():  # examples/crosslingual/run.py, under a name no other module has
    spec = importlib.util.spec_from_file_location("crosslingual_example", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


crosslingual = _load_example()

needs_real = pytest.mark.skipif(
    not real_tokenizer_available(), reason="shared Qwen tokenizer files absent"
)


def corpus() -> list[dict]:
    lines = (EXAMPLE / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


class SpyReranker(Reranker):
    """Records what SearchService hands the reranker; scores by document length (any order will do)."""

    backend = "spy"
    model = "spy"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def load(self) -> None:
        pass

    def samples(self) -> list[Sample]:
        return []

    async def score(self, query: str, docs, instruction: str | None = None) -> list[float]:
        self.calls.append((query, list(docs)))
        return [1.0 / (1 + len(d)) for d in docs]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, embedder):
    spy = SpyReranker()
    settings = crosslingual.example_settings(
        Settings(milvus_uri=str(tmp_path_factory.mktemp("xl") / "x.db"), embed_device="cpu")
    )
    queries = crosslingual.run(settings, embedder=embedder, reranker=spy, top_k=5)
    return settings, queries, spy


def test_example_layout_and_defaults(outcome) -> None:
    settings, queries, _ = outcome
    assert settings.analyzer == "jieba" and settings.collection.startswith("crosslingual_jieba_")
    assert {q.lang for q in queries} == set(crosslingual.GROUPS)
    corpus_ids = {d["_id"] for d in corpus()}
    assert {q.expected for q in queries} <= corpus_ids and len(corpus_ids) == 16
    from evaluation import load_dataset  # the folder is BEIR layout: `pipeline eval` reads it

    assert len(load_dataset(EXAMPLE, "test").queries) == len(queries)


def test_what_the_default_stack_finds(outcome) -> None:
    _, queries, _ = outcome
    s = crosslingual.summary(queries)
    assert s["en"]["hybrid"]["hit@1"] == 1.0 and s["en"]["bm25"]["hit@1"] == 1.0
    # jieba keeps "CRISPR", "GPS", "mRNA", "LED", "Wi-Fi" whole: BM25 matches the English document
    assert s["zh+latin"]["bm25"]["hit@1"] == 1.0 and s["zh+latin"]["hybrid"]["hit@1"] == 1.0
    # a Chinese question shares no word with an English document: BM25 ranks nothing
    assert s["zh"]["bm25"]["hit@3"] == 0.0
    assert all(q.ranks["bm25"] is None for q in queries if q.lang == "zh")


def test_chinese_query_reaches_the_reranker_unchanged(outcome) -> None:
    _, queries, spy = outcome
    sent = {query for query, _ in spy.calls}
    assert {q.text for q in queries} <= sent  # every question, byte for byte
    zh = next(q for q in queries if q.qid == "zh-3")
    docs = next(d for query, d in spy.calls if query == zh.text)
    assert docs and all(d.split("\n", 1)[0] for d in docs)  # title + text of recalled passages
    assert all(q.ranks["rerank"] is not None or q.ranks["hybrid"] is None for q in queries)


def test_jieba_segments_chinese_words_for_bm25(tmp_path: Path) -> None:
    """Lite's standard analyzer keeps a run of Han characters as one token; jieba splits words."""
    docs = [
        Passage("capital", 0, "北京是中国的首都。"),
        Passage("opera", 0, "京剧起源于北方。"),
        Passage("tea", 0, "绿茶起源于中国。"),
    ]
    vectors = np.eye(8, dtype=np.float32)[: len(docs)]
    found = {}
    for analyzer in ("jieba", "standard"):
        store = MilvusStore(str(tmp_path / f"{analyzer}.db"), "zh", analyzer=analyzer)
        store.ensure_collection(8, "m")
        store.upsert(docs, vectors)
        store.flush()
        found[analyzer] = {q: [h.doc_id for h in store.bm25(q, 3)] for q in ("中国的首都", "北京")}
        store.close()
    assert found["jieba"]["中国的首都"][0] == "capital"  # 中国 + 首都
    assert set(found["jieba"]["中国的首都"]) == {"capital", "tea"}  # tea shares 中国 only
    assert found["jieba"]["北京"] == ["capital"]  # 京剧 / 北方 are other words
    assert found["standard"] == {"中国的首都": [], "北京": []}


@needs_real
def test_qwen3_prompt_carries_a_chinese_query_exactly(tiny_reranker_dir: Path) -> None:
    """The prompt string, its token ids and their decoding: the card's, for a Chinese query."""
    from testkit.card_reference import CardReference

    tok = load_real_tokenizer()
    card = CardReference(tiny_reranker_dir)
    pre, suf = prompt.encode_fixed(tok)
    budget = prompt.body_budget(8192, pre, suf)
    doc = corpus()[0]["text"]
    for q in (q for q in crosslingual.load_queries() if q.lang != "en"):
        text = prompt.format_pair(q.text, doc)
        assert f"\n<Query>: {q.text}\n<Document>: " in text
        ids = pre + prompt.encode_bodies(tok, [prompt.format_body(q.text, doc)], budget)[0] + suf
        want = card.process_inputs([card.format_instruction(None, q.text, doc)])["input_ids"][0]
        assert ids == want.tolist()
        assert tok.decode(ids) == text  # byte-level BPE: nothing dropped or normalised


@needs_real
def test_engine_scores_chinese_queries_like_the_card(tiny_engine, tiny_reranker_dir: Path) -> None:
    from testkit.card_reference import CardReference

    card = CardReference(tiny_reranker_dir)
    docs = [
        "Giant pandas live in the mountain forests of Sichuan; almost all of their diet is bamboo.",
        "Tides are the daily rise and fall of sea level.",
        "CRISPR-Cas9 is a gene editing tool adapted from the immune system of bacteria.",
    ]
    for query in ("大熊猫吃什么？", "CRISPR 是如何编辑基因的？"):
        got, want = tiny_engine.score(query, docs), card.score(query, docs)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
