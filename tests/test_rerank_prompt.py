"""The Qwen3-Reranker template (DESIGN.md §4) and token-id lookups."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.rerank import prompt
from testkit.tiny_qwen import build_bpe_tokenizer, load_real_tokenizer, real_tokenizer_available

CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

needs_real = pytest.mark.skipif(
    not real_tokenizer_available(), reason="shared Qwen tokenizer files absent"
)


def test_template_strings_match_card() -> None:
    assert prompt.PREFIX == CARD_PREFIX
    assert prompt.SUFFIX == CARD_SUFFIX
    assert prompt.DEFAULT_INSTRUCTION == (
        "Given a web search query, retrieve relevant passages that answer the query"
    )


def test_format_pair_is_card_string() -> None:
    got = prompt.format_pair("what is x?", "x is y.", "Find it")
    assert (
        got
        == CARD_PREFIX
        + "<Instruct>: Find it\n<Query>: what is x?\n<Document>: x is y."
        + CARD_SUFFIX
    )


def test_default_instruction_used_for_none_and_empty() -> None:
    for instr in (None, ""):
        assert prompt.format_body("q", "d", instr).startswith(
            f"<Instruct>: {prompt.DEFAULT_INSTRUCTION}\n"
        )


def test_query_and_document_sides_concatenate_to_pair() -> None:
    for q, d, i in [("q", "d", None), ("小鼠?", "", "custom"), ("{x}", "{doc}", "{y}")]:
        assert prompt.format_query(q, i) + prompt.format_document(d) == prompt.format_pair(q, d, i)


def test_braces_in_user_text_are_not_format_fields() -> None:
    assert "{query}" in prompt.format_pair("{query}", "{doc}")


def test_head_is_prefix_of_body() -> None:
    body = prompt.format_body("q", "doc", "i")
    head = prompt.format_head("q", "i")
    assert body.startswith(head)
    assert body[len(head) :] == " doc"


def test_body_budget_rejects_too_small_max_length() -> None:
    assert prompt.body_budget(100, [1] * 40, [2] * 9) == 51
    with pytest.raises(ValueError):
        prompt.body_budget(49, [1] * 40, [2] * 9)


def test_bpe_tokenizer_ids() -> None:
    tok = build_bpe_tokenizer()
    yes, no = prompt.yes_no_token_ids(tok)
    assert yes != no
    assert tok.decode([yes]) == "yes"
    assert tok.decode([no]) == "no"
    pre, suf = prompt.encode_fixed(tok)
    assert tok.decode(pre) == prompt.PREFIX
    assert tok.decode(suf) == prompt.SUFFIX


def test_lookup_rejects_tokenizer_without_single_yes() -> None:
    class Fake:
        unk_token_id = 0

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [5, 6]

        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    with pytest.raises(ValueError):
        prompt.yes_no_token_ids(Fake())


@needs_real
def test_real_tokenizer_ids() -> None:
    tok = load_real_tokenizer()
    assert prompt.yes_no_token_ids(tok) == (9693, 2152)
    _, suf = prompt.encode_fixed(tok)
    assert suf == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]


TEMPLATE_CASES = [
    ("capital of China?", "The capital of China is Beijing.", None),
    ('quotes " and \\ backslash', "北京 {{ not jinja }} {% raw %}", "中文指令"),
    ("q\n", "\n\nends with newlines\n\n", "custom instruction"),
    ("", "", None),
]


def test_vllm_chat_template_renders_the_card_prompt() -> None:
    """What ``vllm serve --chat-template deploy/vllm/qwen3_reranker.jinja`` renders (transformers'
    chat renderer, as vLLM calls it, and plain Jinja) is ``format_pair``, byte for byte."""
    import jinja2

    from pipeline.rerank.prompt import format_pair, vllm_chat_template

    template = vllm_chat_template()
    shipped = Path(__file__).resolve().parents[1] / "deploy" / "vllm" / "qwen3_reranker.jinja"
    assert shipped.read_text(encoding="utf-8") == template, (
        "regenerate deploy/vllm/qwen3_reranker.jinja"
    )
    tok = None
    if real_tokenizer_available():
        tok = load_real_tokenizer()
    for query, doc, instruction in TEMPLATE_CASES:
        messages = [{"role": "query", "content": query}, {"role": "document", "content": doc}]
        kw = {"instruction": instruction} if instruction is not None else {}
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        assert env.from_string(template).render(messages=messages, **kw) == format_pair(
            query, doc, instruction
        )
        if tok is not None:
            rendered = tok.apply_chat_template(
                messages, chat_template=template, tokenize=False, **kw
            )
            assert rendered == format_pair(query, doc, instruction)


def _work_estimate_tracks_the_tokenizer(tok) -> None:
    """The batcher's work estimate follows the tokenizer it will run, not a fixed 3 chars/token."""
    from pipeline.rerank.base import RerankRequest
    from pipeline.rerank.cut import DocumentCutter

    cutter = DocumentCutter(tok, 8192)
    doc = (
        "Photosynthesis converts light energy into chemical energy; in 2019, 61% of the 1,204 "
        "leaves sampled (n = 37 plants) showed the effect. "
    ) * 12
    req = RerankRequest("how do plants make oxygen?", [doc])
    real = len(prompt.encode_bodies(tok, [prompt.format_body(req.query, doc, None)], 8192)[0])
    real += cutter.fixed_tokens
    est = cutter.estimate_tokens(req)
    assert real / 2 <= est <= real * 2, (est, real, cutter.chars_per_token)
    long = RerankRequest("q", ["word " * 100_000])
    assert cutter.estimate_tokens(long) > 8192  # uncapped: the batcher caps where the engine cuts


def test_work_estimate_tracks_the_bpe_tokenizer() -> None:
    tok = build_bpe_tokenizer()
    _work_estimate_tracks_the_tokenizer(tok)


@needs_real
def test_work_estimate_tracks_the_real_tokenizer() -> None:
    _work_estimate_tracks_the_tokenizer(load_real_tokenizer())
