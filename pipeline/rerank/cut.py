"""Documents cut by the model card's rule, written back as text: for scorers that take text only.

The card tokenizes the body (instruction + query + document) truncated to ``max_length - len(prefix) -
len(suffix)`` tokens, so a long document loses its tail and the suffix is always kept
(:func:`pipeline.rerank.prompt.encode_bodies`). vLLM takes text, in ``LLM.score`` and in ``vllm serve``'s
``/rerank``, and does not cut that way: the server refuses a prompt over ``--max-model-len`` with a 400,
and its ``max_tokens_per_doc`` cuts the document alone without the card's budget. So both the vLLM engine
and the remote backend send the cut document as text that re-tokenizes to exactly the kept tokens: the
kept document tokens are decoded, the body re-encoded and compared. Only when the cut falls inside a
multi-byte character (its byte tokens cannot be written as text) are those 1-3 trailing byte tokens
dropped; ``inexact_cuts`` counts that.

An uncut prompt is sent as given: special tokens split the text first, so ``PREFIX + body + SUFFIX``
tokenizes to ``prefix_ids + body_ids + suffix_ids``. A body of at most ``budget`` UTF-8 bytes cannot
exceed ``budget`` tokens (a byte-level BPE token covers at least one byte), so callers that need no
token counts skip the tokenizer for such documents (:meth:`DocumentCutter.fits_uncut`).
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.rerank.prompt import (
    MIN_DOC_TOKENS,
    body_budget,
    check_head_fits,
    common_prefix_len,
    encode_bodies,
    encode_fixed,
    format_body,
    format_head,
)
from pipeline.rerank.stats import Stats, counter

if TYPE_CHECKING:
    from pipeline.rerank.prompt import RerankRequest

MAX_CUT_RETRIES = 4  # a UTF-8 character is at most 4 byte tokens
# Tokens a window leaves free in its pair's budget: a window's text re-tokenized after "<Document>: "
# may merge or split a token or two at its edges, and it must never need the card's cut.
WINDOW_SLACK = 8


# Text on which a tokenizer's characters per token are measured for the batcher's work estimate: prose,
# figures, code and two other Latin-script languages, as documents mix them. Qwen3's tokenizer reads
# it at ~3.1 characters a token (SciFact abstracts: ~4.6), so estimates err towards more work.
RATIO_SAMPLE = (
    "Reranking reads a query and a passage together and judges whether the passage answers it. "
    "In 2023, 4,182 of 12,950 samples (32.3%) were relabelled; see Table 2 (p < 0.001).\n"
    "def score(pairs: list[tuple[str, str]]) -> list[float]:\n"
    "    return [model(q, d) for q, d in pairs]\n"
    "Die Suche liefert die besten Treffer zuerst. "
    "La recherche renvoie d'abord les meilleurs résultats."
)


def chars_per_token(tokenizer: Any) -> float:
    """Characters per token of ``tokenizer`` on :data:`RATIO_SAMPLE` (a real BPE ~3, a tiny one ~1)."""
    ids = tokenizer(RATIO_SAMPLE, add_special_tokens=False, verbose=False)["input_ids"]
    return len(RATIO_SAMPLE) / max(1, len(ids))


def _at_most_bytes(text: str, limit: int) -> bool:
    """``len(text.encode()) <= limit``, without encoding text that is surely short (4 bytes a char)."""
    return 4 * len(text) <= limit or len(text.encode("utf-8", "surrogatepass")) <= limit


@dataclass(slots=True)
class Cut:
    """The documents to send (cut where needed) and, when asked for, each pair's prompt tokens."""

    docs: list[str]
    tokens: list[int] | None


@dataclass
class CutStats(Stats):
    """What a :class:`DocumentCutter` counts."""

    cut_documents: int = counter(
        "rerank_cut_documents", "documents cut to the pair limit by the card's rule (as text)"
    )
    inexact_cuts: int = counter(
        "rerank_inexact_cuts", "cuts that dropped trailing byte tokens inside a character"
    )


class DocumentCutter:
    """The card's document cut for one tokenizer and ``max_length``; cheap to call per request."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        # A private copy, used under ``lock``: a fast tokenizer reconfigures itself on every call
        # (truncation on for the card's cut, off for offsets), so a tokenizer shared with the engine's
        # worker thread, or used by two requests at once, can cut one request by another's settings.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.lock = threading.Lock()
        self.max_length = max_length
        self.prefix_ids, self.suffix_ids = encode_fixed(self.tokenizer)
        self.budget = body_budget(max_length, self.prefix_ids, self.suffix_ids)  # validates
        self.counters = CutStats()  # for /metrics (the engine or remote reranker reports them)
        self.chars_per_token = chars_per_token(self.tokenizer)

    @property
    def cut_documents(self) -> int:
        return self.counters.cut_documents

    @property
    def inexact_cuts(self) -> int:
        return self.counters.inexact_cuts

    def estimate_tokens(self, request: RerankRequest) -> int:
        """Prompt tokens of ``request``'s pairs without tokenizing them (cheap: the batcher calls it
        on the event loop), by this tokenizer's measured characters per token. Uncapped: the caller
        applies ``max_length`` where the engine would cut (the cost model needs to see the cap)."""
        head = len(format_body(request.query, "", request.instruction))
        return sum(
            self.fixed_tokens + math.ceil((head + len(d)) / self.chars_per_token)
            for d in request.docs
        )

    @property
    def fixed_tokens(self) -> int:
        """Prefix + suffix tokens, in every prompt."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def fits_uncut(self, request: RerankRequest) -> bool:
        """True when no document can need a cut and the head surely fits: no tokenizer needed."""
        q, instruction = request.query, request.instruction
        if not _at_most_bytes(format_head(q, instruction), self.budget - MIN_DOC_TOKENS):
            return False
        return all(
            _at_most_bytes(format_body(q, d, instruction), self.budget) for d in request.docs
        )

    def cut(self, request: RerankRequest, *, count: bool = True) -> Cut:
        """Documents cut like the card; ``count=False`` tokenizes only documents that may be long.

        Raises :class:`~pipeline.rerank.prompt.PromptTooLong` when instruction + query leave no room
        for the document (only documents are ever cut).
        """
        with self.lock:
            return self._cut(request, count)

    def _cut(self, request: RerankRequest, count: bool) -> Cut:
        q, instruction, docs = request.query, request.instruction, list(request.docs)
        bodies = [format_body(q, d, instruction) for d in docs]
        todo = (
            list(range(len(docs)))
            if count
            else [i for i, b in enumerate(bodies) if not _at_most_bytes(b, self.budget)]
        )
        if not todo and self.fits_uncut(request):
            return Cut(docs, None)
        encoded = encode_bodies(
            self.tokenizer, [format_head(q, instruction)] + [bodies[i] for i in todo], self.budget
        )
        head_ids = encoded[0]
        check_head_fits(len(head_ids), self.budget)
        tokens = [0] * len(docs) if count else None
        for i, body in zip(todo, encoded[1:], strict=True):
            kept = len(body)
            if kept >= self.budget:
                self.counters.cut_documents += 1
                docs[i], kept = self._reconstruct(request, head_ids, body)
            if tokens is not None:
                tokens[i] = self.fixed_tokens + kept
        return Cut(docs, tokens)

    def windows(self, request: RerankRequest, max_windows: int, overlap: int) -> list[list[str]]:
        """Per document, the texts of up to ``max_windows`` overlapping windows that each fit the pair
        budget beside the query (a document that fits is its own single window, as given).

        Windows are cut from the document's own tokens (their character offsets), ``overlap`` tokens
        shared by neighbours; a document longer than ``max_windows`` windows is cut after the last,
        as the card cuts. Raises :class:`~pipeline.rerank.prompt.PromptTooLong` when the query
        leaves no room for a document.
        """
        with self.lock:
            return self._windows(request, max_windows, overlap)

    def _windows(self, request: RerankRequest, max_windows: int, overlap: int) -> list[list[str]]:
        q, instruction = request.query, request.instruction
        head_ids = encode_bodies(self.tokenizer, [format_head(q, instruction)], self.budget)[0]
        check_head_fits(len(head_ids), self.budget)
        room = max(MIN_DOC_TOKENS, self.budget - len(head_ids) - WINDOW_SLACK)
        stride = max(1, room - min(max(0, overlap), room // 2))
        out: list[list[str]] = []
        for doc in request.docs:
            if max_windows <= 1 or _at_most_bytes(format_body(q, doc, instruction), self.budget):
                out.append([doc])
                continue
            enc = self.tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            spans = enc["offset_mapping"]
            if len(spans) <= room:
                out.append([doc])
                continue
            texts = []
            for start in range(0, len(spans), stride):
                stop = min(start + room, len(spans))
                texts.append(doc[spans[start][0] : spans[stop - 1][1]].lstrip())
                if stop == len(spans) or len(texts) == max_windows:
                    break
            out.append(texts)
        return out

    def _reconstruct(
        self, request: RerankRequest, head_ids: list[int], body: list[int]
    ) -> tuple[str, int]:
        """Document text whose body re-tokenizes to ``body`` (the card's cut), and its length."""
        tok = self.tokenizer
        shared = common_prefix_len(head_ids, body)
        keep = len(body)
        for _ in range(MAX_CUT_RETRIES):
            text = tok.decode(
                body[shared:keep], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if text.startswith(" "):  # "<Document>:" + " " + document
                doc = text[1:]
                again = encode_bodies(
                    tok, [format_body(request.query, doc, request.instruction)], self.budget
                )[0]
                if again == body[:keep]:
                    if keep != len(body):
                        self.counters.inexact_cuts += 1
                    return doc, keep
            keep -= 1
            if keep <= shared:
                break
        raise RuntimeError("could not write a cut document as text that keeps its tokens")

    def token_counter(self) -> TokenCounter:
        """A :class:`TokenCounter` over a copy of this cutter's tokenizer (copied under its lock)."""
        with self.lock:
            return TokenCounter(self.tokenizer, self.max_length)


class TokenCounter:
    """Tokens each pair's prompt holds as the model reads it (prefix + body cut to the card's
    budget + suffix): the ``usage`` of the rerank and score answers.

    It works on a private copy of the tokenizer, with truncation and padding off: a fast tokenizer
    reconfigures itself on calls that truncate, and the engine's worker thread uses its own at the
    same time (sharing one raises "Already borrowed"). Counting never touches the cutter's counters.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        prefix_ids, suffix_ids = encode_fixed(tokenizer)
        self.fixed = len(prefix_ids) + len(suffix_ids)
        self.budget = body_budget(max_length, prefix_ids, suffix_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers have one
        self._fast: Any = None
        self._slow: Any = None
        if backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
        else:
            import copy

            self._slow = copy.deepcopy(tokenizer)

    def pair_tokens(self, request: RerankRequest) -> list[int]:
        q, instruction = request.query, request.instruction
        bodies = [format_body(q, d, instruction) for d in request.docs]
        if not bodies:
            return []
        if self._fast is not None:
            lengths = [
                len(e.ids) for e in self._fast.encode_batch(bodies, add_special_tokens=False)
            ]
        else:
            ids = self._slow(bodies, add_special_tokens=False, return_attention_mask=False)
            lengths = [len(x) for x in ids["input_ids"]]
        return [self.fixed + min(n, self.budget) for n in lengths]
