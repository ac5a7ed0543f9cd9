"""Build tiny random Qwen3 reranker checkpoints for tests (no weights can be downloaded here).

``build_tiny_reranker(out_dir)`` writes a directory that ``AutoTokenizer`` / ``AutoModelForCausalLM``
``.from_pretrained`` load: a 2-layer Qwen3 with either the real Qwen tokenizer (from
``../shared/models/qwen3-tokenizer``, see testkit/shared_dir.py, when present) or a small byte-level BPE built in code with the
Qwen special tokens and single-token ``yes`` / ``no``. The yes/no LM-head rows are scaled so scores
spread over (0, 1) instead of sitting at 0.5, which makes exactness checks meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from testkit.shared_dir import QWEN3_TOKENIZER

REAL_TOKENIZER_DIR = QWEN3_TOKENIZER
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The Qwen2/Qwen3 pre-tokenizer regex: keeps token boundaries identical in kind to the real tokenizer.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# hidden, MLP and attention sizes: "tiny" for the transformers tests, "vllm-cpu" for vLLM's CPU kernels.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "vllm-cpu": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 128,
    },
}
_CORPUS = [
    "yes\nno\nyes no Yes No",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query",
    "<Query>: what is the capital of China?\n<Document>: The capital of China is Beijing.",
    "system user assistant think Gravity is a force that attracts two bodies towards each other.",
    "Alterations of the architecture of cerebral white matter in the developing human brain.",
]


def real_tokenizer_available() -> bool:
    return (REAL_TOKENIZER_DIR / "vocab.json").is_file()


def build_bpe_tokenizer(vocab_size: int = 600):  # -> PreTrainedTokenizerFast
    """A small byte-level BPE with Qwen's pre-tokenizer and special tokens, trained in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    for word in ("yes", "no"):
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny BPE did not learn {word!r} as one token")
    return fast


def load_real_tokenizer():  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REAL_TOKENIZER_DIR))


def _spread_yes_no(model, tok, target_std: float) -> None:  # (Qwen3ForCausalLM, tokenizer)
    """Rewrite the yes/no LM-head rows so P(yes) varies across inputs instead of sitting near 0.5.

    Random weights make the last hidden state of every prompt nearly the same vector (the last token
    is always the suffix), so the logit difference is set along the main direction in which those
    states *differ*, centred on their mean and scaled to ``target_std``.
    """
    import torch

    from pipeline.rerank.prompt import format_pair

    queries = ["what is the capital of China?", "Explain gravity", "小鼠", "q"]
    docs = ["The capital of China is Beijing.", "", "Gravity is a force.", "北京", "yes no " * 5]
    texts = [format_pair(q, d) for q in queries for d in docs]
    with torch.no_grad():
        hidden = torch.stack(
            [
                model.model(
                    torch.tensor([tok.encode(t, add_special_tokens=False)])
                ).last_hidden_state[0, -1]
                for t in texts
            ]
        )
        mean = hidden.mean(0)
        _, _, v = torch.linalg.svd(hidden - mean, full_matrices=False)
        u = v[0]
        diff = (
            u - (u @ mean) / (mean @ mean) * mean
        )  # orthogonal to the mean: logits centred near 0
        spread = (hidden @ diff).std()
        diff = diff * (target_std / spread)
        w = model.get_output_embeddings().weight
        yes = tok.convert_tokens_to_ids("yes")
        no = tok.convert_tokens_to_ids("no")
        w[yes] = diff / 2
        w[no] = -diff / 2


def build_tiny_reranker(
    out_dir: str | Path,
    tokenizer: Literal["auto", "real", "bpe"] = "auto",
    *,
    seed: int = 0,
    num_layers: int = 2,
    yes_no_std: float = 3.0,
    shape: Literal["tiny", "vllm-cpu"] = "tiny",
) -> Path:
    """Write a tiny random Qwen3 causal LM + tokenizer to ``out_dir`` and return the path.

    ``tokenizer="auto"`` uses the real Qwen tokenizer when the shared files exist, else the BPE one;
    ``"real"`` raises ``FileNotFoundError`` when they are absent (tests skip on that).
    ``shape="vllm-cpu"``: heads of 128 (the real model's head_dim), because vLLM's CPU attention
    kernel refuses head_dim 16 ("Unsupported CPU attention configuration: head_dim=16").
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "real" or (tokenizer == "auto" and real_tokenizer_available()):
        if not real_tokenizer_available():
            raise FileNotFoundError(f"real Qwen tokenizer not found at {REAL_TOKENIZER_DIR}")
        tok = load_real_tokenizer()
    else:
        tok = build_bpe_tokenizer()
    vocab = len(tok)
    dims = SHAPES[shape]
    config = Qwen3Config(
        vocab_size=vocab,
        **dims,
        num_hidden_layers=num_layers,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    _spread_yes_no(model, tok, target_std=yes_no_std)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
