"""Hybrid fusion settings: the ranker Milvus is given, the order each setting produces, bad weights.

The expected orders are computed here from the store's own dense and BM25 lists with the
published formulas (RRF; Milvus's WeightedRanker normalisation; min-max), so a store that hands
Milvus the wrong ranker, ignores a weight or fuses the wrong way fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import MilvusServer

from pipeline.config import (
    FIELDS,
    Settings,
    SettingsError,
    add_settings_arguments,
    settings_from_args,
)
from pipeline.domain import Hit, Passage
from pipeline.fusion import minmax, normalized_fusion
from pipeline.store import MilvusStore

DIM = 8
TEXT = "tidal moon"


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


QUERY = unit(1, 0, 0)
# dense favours a, BM25 favours b (no query word in a), c is good on both: each fusion below
# puts a different passage first
PASSAGES = [
    (Passage("a", 0, "a note on harbour cranes and shipping", "", {"lang": "en"}), unit(1, 0.05)),
    (Passage("b", 0, "tidal tidal tidal tidal moon pull", "", {"lang": "en"}), unit(0.2, 1)),
    (Passage("c", 0, "the tidal moon and the sea", "", {"lang": "fr"}), unit(1, 0.6)),
    (Passage("d", 0, "ocean tidal charts", "", {"lang": "en"}), unit(1, 1, 0.3)),
    (Passage("e", 0, "volcano ash lava", "", {"lang": "en"}), unit(0.1, 0.1, 1)),
    (Passage("f", 0, "moon landing history", "", {"lang": "en"}), unit(0.6, 0.2, 1)),
]


def fill(store: MilvusStore) -> MilvusStore:
    store.ensure_collection(DIM, "test-model")
    store.upsert([p for p, _ in PASSAGES], np.stack([v for _, v in PASSAGES]))
    store.flush()
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MilvusStore:
    s = fill(MilvusStore(str(tmp_path_factory.mktemp("fusion") / "f.db"), "t"))
    yield s
    s.close()


def expected(store: MilvusStore, fusion: str, weights=(0.5, 0.5), rrf_k=60) -> list[str]:
    """Doc ids best first, fused by hand from the store's own dense and BM25 lists."""
    dense, bm25 = store.dense(QUERY, 10), store.bm25(TEXT, 10)
    norm = {
        "rrf": [lambda i, s: 1 / (rrf_k + i + 1)] * 2,
        # Milvus WeightedRanker, norm_score=True: COSINE (1 + s) / 2, BM25 2·atan(s)/π
        "weighted": [lambda i, s: (1 + s) / 2, lambda i, s: 2 * math.atan(s) / math.pi],
    }
    total: dict[str, float] = {}
    ids = {}
    for route, hits in enumerate((dense, bm25)):
        scores = minmax([h.score for h in hits])
        for i, h in enumerate(hits):
            ids[h.doc_id] = h.id
            if fusion == "normalized":
                add = weights[route] * scores[i]
            else:
                add = (weights[route] if fusion == "weighted" else 1) * norm[fusion][route](
                    i, h.score
                )
            total[h.doc_id] = total.get(h.doc_id, 0.0) + add
    return sorted(total, key=lambda d: (-round(total[d], 6), ids[d]))


def order(store: MilvusStore, fusion: str, weights=(0.5, 0.5), rrf_k=60, **kw) -> list[Hit]:
    store.fusion, store.fusion_weights, store.rrf_k = fusion, weights, rrf_k
    return store.hybrid(QUERY, TEXT, 10, **kw)


def test_ranker_given_to_milvus() -> None:
    s = MilvusStore("x.db", "t", rrf_k=20)
    assert s.ranker().dict() == {"strategy": "rrf", "params": {"k": 20}}
    s = MilvusStore("x.db", "t", fusion="weighted", fusion_weights=(0.7, 0.3))
    assert s.ranker().dict() == {
        "strategy": "weighted",
        "params": {"weights": [0.7, 0.3], "norm_score": True},
    }
    with pytest.raises(ValueError, match="not done by a Milvus ranker"):
        MilvusStore("x.db", "t", fusion="normalized").ranker()
    with pytest.raises(ValueError, match="fusion must be one of"):
        MilvusStore("x.db", "t", fusion="max")


def test_settings_reach_the_store() -> None:
    s = Settings(fusion="normalized", fusion_dense_weight=0.8, fusion_bm25_weight=0.1, rrf_k=5)
    store = MilvusStore.from_settings(s.store)
    assert (store.fusion, store.fusion_weights, store.rrf_k) == ("normalized", (0.8, 0.1), 5)


@pytest.mark.parametrize(
    ("fusion", "weights", "rrf_k", "first"),
    [
        ("rrf", (0.5, 0.5), 60, "c"),
        ("weighted", (0.5, 0.5), 60, "c"),
        ("weighted", (0.9, 0.1), 60, "a"),
        ("weighted", (0.1, 0.9), 60, "b"),
        ("normalized", (0.8, 0.2), 60, "a"),
        ("normalized", (0.2, 0.8), 60, "b"),
    ],
)
def test_each_setting_orders_as_its_formula(
    store: MilvusStore, fusion: str, weights: tuple[float, float], rrf_k: int, first: str
) -> None:
    hits = order(store, fusion, weights, rrf_k)
    assert [h.doc_id for h in hits] == expected(store, fusion, weights, rrf_k)
    assert hits[0].doc_id == first
    assert all(h.score > 0 for h in hits[:-1]) and hits == sorted(hits, key=lambda h: -h.score)


def test_settings_give_different_orders(store: MilvusStore) -> None:
    """The three methods (and the weights) really differ on this data: no test above is vacuous."""
    seen = {
        (f, w): tuple(h.doc_id for h in order(store, f, w))
        for f in ("rrf", "weighted", "normalized")
        for w in ((0.5, 0.5), (0.8, 0.2))
        if not (f == "rrf" and w != (0.5, 0.5))
    }
    assert len(set(seen.values())) == len(seen), seen


def test_normalized_scores_and_filter(store: MilvusStore) -> None:
    hits = order(store, "normalized", (0.8, 0.2))
    top = {h.doc_id: h.score for h in hits}
    assert top["a"] == pytest.approx(0.8)  # best dense (1.0 × 0.8), absent from BM25
    assert min(top.values()) == pytest.approx(0.0)  # e: last in dense, absent from BM25
    en = order(store, "normalized", (0.5, 0.5), filter='metadata["lang"] == "en"')
    assert "c" not in {h.doc_id for h in en} and len(en) == 5  # both lists were filtered
    assert order(store, "normalized", (0.5, 0.5))[0].doc_id == "c"


def test_empty_text_falls_back_to_dense(store: MilvusStore) -> None:
    store.fusion = "normalized"
    assert [h.doc_id for h in store.hybrid(QUERY, "  ", 3)] == ["a", "c", "d"]


def test_weighted_on_server_process(milvus_server: MilvusServer) -> None:
    """The gRPC path (as a Milvus server): BM25 arrives positive, the weighted order is the same."""
    s = MilvusStore(milvus_server.uri, "t_fusion", timeout=10)
    if s.exists():
        s.drop()
    fill(s)
    for weights in ((0.5, 0.5), (0.9, 0.1), (0.1, 0.9)):
        assert [h.doc_id for h in order(s, "weighted", weights)] == expected(s, "weighted", weights)
    s.close()


def test_normalized_fusion_by_hand() -> None:
    def hit(i: str, score: float) -> Hit:
        return Hit(i, i, 0, "", "", {}, score)

    dense = [hit("x", 0.9), hit("y", 0.5), hit("z", 0.1)]
    bm25 = [hit("z", 30.0), hit("w", 10.0)]
    got = normalized_fusion(dense, bm25, 0.6, 0.4, 3)
    # x 0.6·1, y 0.6·0.5, z 0.6·0 + 0.4·1, w 0.4·0: w is cut by k
    assert [(h.id, round(h.score, 6)) for h in got] == [("x", 0.6), ("z", 0.4), ("y", 0.3)]
    assert minmax([2.0, 2.0]) == [1.0, 1.0] and minmax([]) == []
    tie = normalized_fusion([hit("q", 1.0)], [hit("p", 1.0)], 0.5, 0.5, 2)
    assert [h.id for h in tie] == ["p", "q"]  # equal scores: by id, as Milvus orders ties


# --- settings: env names, flags, clear errors -------------------------------------------------


def test_fusion_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_FUSION", "weighted")
    monkeypatch.setenv("WINNOW_FUSION_DENSE_WEIGHT", "0.7")
    monkeypatch.setenv("WINNOW_FUSION_BM25_WEIGHT", "0.3")
    s = Settings()
    assert (s.fusion, s.fusion_dense_weight, s.fusion_bm25_weight) == ("weighted", 0.7, 0.3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fusion-dense-weight", "1.5"], r"WINNOW_FUSION_DENSE_WEIGHT \(--fusion-dense-weight\)"),
        (
            ["--fusion-bm25-weight", "-0.1"],
            r"WINNOW_FUSION_BM25_WEIGHT .*greater than or equal to 0",
        ),
        (["--fusion-bm25-weight", "nan"], r"WINNOW_FUSION_BM25_WEIGHT .*finite number"),
        (["--fusion-dense-weight", "0", "--fusion-bm25-weight", "0"], "are both 0"),
    ],
)
def test_invalid_weights_are_named(flags: list[str], message: str) -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_settings_arguments(p)
    with pytest.raises(SettingsError, match=message):
        settings_from_args(p.parse_args(flags))


def test_cli_refuses_bad_fusion_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "nowhere", "--fusion", "normalized", "--fusion-dense-weight", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid settings: WINNOW_FUSION_DENSE_WEIGHT" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["eval", "nowhere", "--fusion", "max"])
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_readme_documents_every_setting() -> None:
    """README's configuration table (generated, tests/test_settings_docs.py) has every setting's row."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [n for n in FIELDS if f"| `WINNOW_{n.upper()}` |" not in readme]
    assert not missing, f"README configuration table lacks: {missing}"


def test_one_registry_names_the_methods() -> None:
    """Config's choices, the stores' validation and bench's grid all come from pipeline.fusion."""
    import typing

    from pipeline.fusion import FUSIONS, FusionParams, fusion, fusion_help

    field = FIELDS["fusion"]
    assert typing.get_args(field.annotation) == tuple(FUSIONS)
    assert fusion_help() in (field.description or "")
    for name, method in FUSIONS.items():
        assert fusion(name) is method and method.name == name
        if method.milvus_ranker is not None:
            assert method.milvus_ranker(FusionParams()).dict()["strategy"]
        assert f"`{name}` (" in fusion_help()
    with pytest.raises(ValueError, match=f"fusion must be one of {', '.join(FUSIONS)}, not 'max'"):
        fusion("max")


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_registry_formula_is_what_milvus_computes(store: MilvusStore, fusion: str) -> None:
    """The registry's formula of a Milvus ranker gives Milvus's order (the test double and bench
    fuse with it), with the scores to float32 precision."""
    from pipeline.fusion import fusion as method

    for weights, rrf_k in (((0.5, 0.5), 60), ((0.8, 0.2), 5)):
        got = order(store, fusion, weights, rrf_k)
        want = method(fusion).fuse(
            store.dense(QUERY, 10), store.bm25(TEXT, 10), store.fusion_params, 10
        )
        assert [h.id for h in got] == [h.id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5)
