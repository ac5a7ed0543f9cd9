"""The rerank dialects as pure functions (pipeline/api/dialects.py) and the body schemas: fast, no server."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import TypeAdapter, ValidationError

from pipeline.api import dialects
from pipeline.api.schemas import AnyRerankBody, AnyScoreBody, RerankBody, TeiRerankBody
from pipeline.config import Settings
from pipeline.domain import invalid_unicode_at
from pipeline.ranking import Ranked, RerankResponse, ScoreResponse

RERANK = TypeAdapter(AnyRerankBody)
SCORE = TypeAdapter(AnyScoreBody)


def answer(scores: dict[int, float], n: int, tokens: int = 30) -> RerankResponse:
    order = sorted(scores, key=scores.get, reverse=True)
    return RerankResponse([Ranked(i, scores[i]) for i in order], n, "m", 1.0, None, tokens)


def test_logit_inverts_p_yes_and_saturates_finite() -> None:
    for z in (-12.0, -1.5, 0.0, 0.3, 9.0):
        assert dialects.logit(1 / (1 + math.exp(-z))) == pytest.approx(z, abs=1e-9)
    assert math.isfinite(dialects.logit(1.0)) and dialects.logit(1.0) > 36
    assert math.isfinite(dialects.logit(0.0)) and dialects.logit(0.0) < -36


def test_body_picks_the_dialect() -> None:
    tei = RERANK.validate_python({"query": "q", "texts": ["a"]})
    assert isinstance(tei, TeiRerankBody)
    cohere = RERANK.validate_python({"query": "q", "documents": ["a"], "texts": ["ignored"]})
    assert isinstance(cohere, RerankBody)
    with pytest.raises(ValidationError):
        RERANK.validate_python({"query": "q"})


def test_tei_call_and_answer() -> None:
    body = RERANK.validate_python(
        {"query": "q", "texts": ["a", "b", "c"], "return_text": True, "raw_scores": True}
    )
    call = dialects.rerank_call(body)
    assert call.dialect == "tei" and call.truncate and call.top_n is None
    out = dialects.rerank_answer(call, answer({0: 0.2, 1: 0.9, 2: 0.5}, 3), id_="x", created=1)
    assert [r["index"] for r in out] == [1, 2, 0]
    assert out[0] == {"index": 1, "score": pytest.approx(math.log(9)), "text": "b"}
    plain = dialects.rerank_call(RERANK.validate_python({"query": "q", "texts": ["a"]}))
    assert dialects.rerank_answer(plain, answer({0: 0.25}, 1), id_="x", created=1) == [
        {"index": 0, "score": 0.25}
    ]
    refuse = RERANK.validate_python({"query": "q", "texts": ["a"], "truncate": False})
    assert dialects.rerank_call(refuse).truncate is False
    with pytest.raises(ValidationError, match="truncation_direction"):
        RERANK.validate_python({"query": "q", "texts": ["a"], "truncation_direction": "Left"})


def test_documents_answer_has_usage_and_cohere_shape() -> None:
    body = RERANK.validate_python(
        {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 0, "return_documents": True}
    )
    call = dialects.rerank_call(body)
    assert call.top_n == 0 and call.texts == ["a", "b"]
    out = dialects.rerank_answer(call, answer({0: 0.1, 1: 0.7}, 2, 44), id_="i", created=5)
    assert out["results"][0] == {"index": 1, "relevance_score": 0.7, "document": {"text": "b"}}
    assert out["usage"] == {"documents": 2, "prompt_tokens": 44, "total_tokens": 44}
    assert out["object"] == "rerank" and out["created"] == 5 and "below_min_score" not in out
    json.dumps(out, allow_nan=False)


def test_rank_fields_make_the_text() -> None:
    docs = [{"title": "T", "body": "B", "x": 1}, "plain"]
    body = RerankBody.model_validate(
        {"query": "q", "documents": docs, "rank_fields": ["title", "body"]}
    )
    assert body.texts() == ["T\nB", "plain"]
    with pytest.raises(ValidationError, match=r"documents\[0\] has none of the rank_fields"):
        RerankBody.model_validate({"query": "q", "documents": docs, "rank_fields": ["nope"]})
    mixed = [{"text": "t", "n": 3}, {"text": "u"}]
    body = RerankBody.model_validate({"query": "q", "documents": mixed, "rank_fields": ["n"]})
    assert body.texts() == ["3", "u"]  # a JSON value as JSON; none of the fields: its text
    with pytest.raises(ValidationError):  # an object without text and no rank_fields
        RerankBody.model_validate({"query": "q", "documents": [{"title": "T"}]})


@pytest.mark.parametrize(
    ("body", "queries", "documents"),
    [
        ({"text_1": "q", "text_2": ["a", "b"]}, ["q"], ["a", "b"]),
        ({"queries": ["q"], "documents": "a"}, ["q"], ["a"]),
        ({"queries": ["q", "r"], "items": ["a", "b"]}, ["q", "r"], ["a", "b"]),
        ({"data_1": "q", "data_2": ["a"], "user": "u", "priority": 0}, ["q"], ["a"]),
    ],
)
def test_score_shapes(body: dict, queries: list[str], documents: list[str]) -> None:
    call = dialects.score_call(SCORE.validate_python(body))
    assert (call.queries, call.documents, call.raw) == (queries, documents, False)


def test_score_options_and_answer() -> None:
    call = dialects.score_call(
        SCORE.validate_python(
            {"text_1": "q", "text_2": ["a", "b"], "use_activation": False, "max_tokens_per_doc": 0}
        )
    )
    assert call.raw and call.max_tokens_per_doc is None
    out = dialects.score_answer(call, ScoreResponse([0.5, 0.9], "m", 12), id_="s", created=3)
    assert out["object"] == "list" and out["model"] == "m"
    assert [d["index"] for d in out["data"]] == [0, 1] and out["data"][0]["score"] == 0.0
    assert out["usage"] == {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0}
    for refused in ({"truncate_prompt_tokens": 10}, {"truncation_side": "left"}):
        with pytest.raises(ValidationError):
            SCORE.validate_python({"text_1": "q", "text_2": ["a"], **refused})
    with pytest.raises(ValidationError):
        SCORE.validate_python({"text_1": "q", "text_2": []})


def test_info_and_models_name_no_path(tmp_path) -> None:
    s = Settings(max_documents=7)
    info = dialects.tei_info(s, str(tmp_path / "my-reranker"), "1.2.3")
    assert info["model_id"] == "my-reranker" and info["max_client_batch_size"] == 7
    assert set(info["model_type"]) == {"reranker"} and info["version"] == "1.2.3"
    assert dialects.model_list("Qwen/Qwen3-Reranker-0.6B", s, 1)["data"][0]["id"] == (
        "Qwen/Qwen3-Reranker-0.6B"
    )
    assert dialects.model_list(None, s, 1)["data"] == []


def test_invalid_unicode_is_found_and_named() -> None:
    bad = json.loads('"\\ud800x"')
    assert invalid_unicode_at({"q": "ok", "d": ["a", {"text": bad}]}) == "d[1].text (character 0)"
    assert invalid_unicode_at({bad: 1}) == "a key of the object"
    assert invalid_unicode_at({"q": "fine ☃", "n": 3}) is None
    for adapter, body in (
        (RERANK, {"query": "q", "documents": ["a", bad]}),
        (RERANK, {"query": "q", "texts": [bad]}),
        (SCORE, {"text_1": bad, "text_2": ["a"]}),
    ):
        with pytest.raises(ValidationError, match="not valid Unicode"):
            adapter.validate_python(body)
