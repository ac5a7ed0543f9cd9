"""The Qwen3-Reranker model card's transformers code: the one copy tests and benchmarks compare to.

From the QwenLM/Qwen3-Embedding README (transformers usage), kept verbatim in logic: ``format_instruction``,
``process_inputs`` (tokenize the body with truncation to ``max_length - len(prefix) - len(suffix)``, wrap
with the prefix/suffix ids, left-pad) and ``compute_logits`` (``logits[:, -1, :]``, yes/no, log-softmax).
The prompt strings are the card's own, written here as the card writes them; nothing is imported from
``pipeline`` so the code under test cannot change its own reference. Only torch + transformers needed.

One deviation, same numbers: ``logits_to_keep=1`` (``keep_last=True``, the default) projects only the
last position onto the vocabulary instead of all of them; the card then keeps the last one anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_DEFAULT_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)


class CardReference:
    """The card's scorer; ``score(query, docs)`` runs all pairs of a query in one batch, as the card."""

    def __init__(
        self,
        path: Any,
        dtype: Any = None,
        device: str = "cpu",
        max_length: int = 8192,
        keep_last: bool = True,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype if dtype is not None else torch.float32,
                attn_implementation="sdpa",
            )
            .to(device)
            .eval()
        )
        self.device = device
        self.max_length = max_length
        self.keep_last = keep_last
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.prefix_tokens = self.tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction: str | None, query: str, doc: str) -> str:
        if instruction is None:
            instruction = CARD_DEFAULT_INSTRUCTION
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs: list[str], max_length: int | None = None) -> Any:
        max_length = max_length if max_length is not None else self.max_length
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt")
        for key in inputs:
            inputs[key] = inputs[key].to(self.device)
        return inputs

    def compute_logits(self, inputs: Any) -> list[float]:
        import torch

        with torch.no_grad():
            kw = {"logits_to_keep": 1} if self.keep_last else {}
            batch_scores = self.model(**inputs, **kw).logits[:, -1, :]
            true_vector = batch_scores[:, self.token_true_id]
            false_vector = batch_scores[:, self.token_false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()

    def score(
        self,
        query: str,
        docs: Sequence[str],
        instruction: str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        """All pairs of the query in one batch (``batch_size=None``, as the card) or in fixed slices."""
        pairs = [self.format_instruction(instruction, query, d) for d in docs]
        step = batch_size if batch_size is not None else max(len(pairs), 1)
        out: list[float] = []
        for i in range(0, len(pairs), step):
            out += self.compute_logits(self.process_inputs(pairs[i : i + step], max_length))
        return out
