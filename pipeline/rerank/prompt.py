"""The Qwen3-Reranker prompt: the one place the template lives (DESIGN.md §4).

Every backend builds its inputs from these strings so that scores match the model card's reference code.
The body is split at ``<Document>:`` so the HF engine can share the system + instruction + query tokens
of a request (``head``) across all of its documents; :func:`format_pair` gives the whole string (vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

BODY_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
# The body up to (excluding) the space before the document. ":" then " " is always a pre-token boundary
# in Qwen's byte-level BPE, but the HF engine still verifies token by token (longest common prefix).
HEAD_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
# vLLM score() templates (model card): the query side carries the prefix, the document side the suffix.
QUERY_TEMPLATE = PREFIX + "<Instruct>: {instruction}\n<Query>: {query}\n"
DOCUMENT_TEMPLATE = "<Document>: {doc}" + SUFFIX

YES_TOKEN = "yes"
NO_TOKEN = "no"


def resolve_instruction(instruction: str | None) -> str:
    """``None`` (or empty) means the default instruction, as in the card's ``format_instruction``."""
    return instruction if instruction else DEFAULT_INSTRUCTION


def format_body(query: str, doc: str, instruction: str | None = None) -> str:
    """The user turn between PREFIX and SUFFIX; the reference tokenizes (and truncates) only this."""
    return BODY_TEMPLATE.format(instruction=resolve_instruction(instruction), query=query, doc=doc)


def format_head(query: str, instruction: str | None = None) -> str:
    """The document-independent start of the body, shared by every pair of a request."""
    return HEAD_TEMPLATE.format(instruction=resolve_instruction(instruction), query=query)


def format_pair(query: str, doc: str, instruction: str | None = None) -> str:
    """The full prompt string for one (query, document) pair; score = P(yes) at its last token."""
    return PREFIX + format_body(query, doc, instruction) + SUFFIX


def format_query(query: str, instruction: str | None = None) -> str:
    """Query side of the card's vLLM example: PREFIX + instruction + query (ends with a newline)."""
    return QUERY_TEMPLATE.format(instruction=resolve_instruction(instruction), query=query)


def format_document(doc: str) -> str:
    """Document side of the card's vLLM example; ``format_query(q) + format_document(d) == format_pair(q, d)``."""
    return DOCUMENT_TEMPLATE.format(doc=doc)


def _single_token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(token)
    if len(ids) != 1 or ids[0] != tid or tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(
            f"tokenizer has no single token for {token!r} (got {ids}); not a Qwen3 reranker?"
        )
    return int(tid)


def yes_no_token_ids(tokenizer: Any) -> tuple[int, int]:
    """``(yes_id, no_id)`` looked up from the tokenizer (9693 / 2152 for Qwen3; never hard-coded)."""
    return _single_token_id(tokenizer, YES_TOKEN), _single_token_id(tokenizer, NO_TOKEN)


def encode_fixed(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of PREFIX and SUFFIX, encoded without special-token insertion as the card does."""
    return (
        list(tokenizer.encode(PREFIX, add_special_tokens=False)),
        list(tokenizer.encode(SUFFIX, add_special_tokens=False)),
    )


class PromptTooLong(ValueError):
    """Instruction + query leave no room for the document within ``max_length`` (answered 422).

    The card truncates the whole body from its end; with an oversized head that would cut the query and
    every document away and score the instruction alone. Winnow refuses instead: only documents are cut.
    """


def encode_bodies(tokenizer: Any, bodies: Sequence[str], budget: int) -> list[list[int]]:
    """The card's body tokenization (the same call), shared by every backend: cut to ``budget``.

    The body ends with the document, so cutting from the end cuts the document and never the suffix
    (which is added after). Callers check that the head fits first (:func:`check_head_fits`).
    """
    return tokenizer(
        list(bodies),
        padding=False,
        truncation="longest_first",
        max_length=budget,
        return_attention_mask=False,
    )["input_ids"]


MIN_DOC_TOKENS = 16  # the least room for the document a request's head must leave


def check_head_fits(head_tokens: int, budget: int, min_doc_tokens: int = MIN_DOC_TOKENS) -> None:
    """Raise :class:`PromptTooLong` unless ``min_doc_tokens`` of document fit after the head."""
    if head_tokens + min_doc_tokens > budget:
        raise PromptTooLong(
            f"instruction + query take {head_tokens} tokens; with the prompt template that leaves "
            f"less than {min_doc_tokens} tokens for the document (limit {budget}, "
            "WINNOW_RERANK_MAX_LENGTH): shorten the instruction or the query"
        )


def body_budget(max_length: int, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> int:
    """Tokens left for the body (instruction + query + document) so the suffix is never cut."""
    budget = max_length - len(prefix_ids) - len(suffix_ids)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the body "
            f"(prefix {len(prefix_ids)} + suffix {len(suffix_ids)} tokens)"
        )
    return budget


def vllm_chat_template() -> str:
    """A ``vllm serve --chat-template`` that renders exactly :func:`format_pair` (query / document roles).

    vLLM's own ``qwen3_reranker.jinja`` (0.32) ends in the suffix's ``\\n\\n`` as template text, and
    transformers' renderer drops a template's final newline: the prompt then ends ``</think>\\n``, not
    the card's ``</think>\\n\\n``, and every score is taken at the wrong token. Here the prompt is a
    single expression of string literals (JSON escapes are valid Jinja), so no whitespace rule of the
    renderer can change it. An ``instruction`` template argument (vLLM's rerank ``instruction`` field)
    replaces the default, as in the card's ``format_instruction``. Generated from this module, so it
    cannot drift from the prompt the other backends use (deploy/vllm/qwen3_reranker.jinja is its
    output; a test checks both).
    """
    import json
    import string

    instruction = f"(instruction if instruction is defined and instruction else {json.dumps(DEFAULT_INSTRUCTION)})"
    fields = {"instruction": instruction, "query": "query", "doc": "document"}
    parts = [json.dumps(PREFIX)]
    for literal, name, _, _ in string.Formatter().parse(BODY_TEMPLATE):
        if literal:
            parts.append(json.dumps(literal))
        if name is not None:
            parts.append(fields[name])
    parts.append(json.dumps(SUFFIX))
    role = '{{%- set {0} = messages | selectattr("role", "eq", "{0}") | map(attribute="content") | first -%}}'
    return (
        "{#- Qwen3-Reranker prompt for vllm serve --chat-template, generated by Winnow "
        "(pipeline.rerank.prompt.vllm_chat_template): the model card's prompt, exactly. -#}\n"
        + role.format("query")
        + "\n"
        + role.format("document")
        + "\n{{- "
        + " ~ ".join(parts)
        + " -}}\n"
    )


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens two id lists share at their start (a request's head is its bodies' shared prefix)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """One query with its documents; the unit the batcher merges across concurrent requests."""

    query: str
    docs: Sequence[str]
    instruction: str | None = None
