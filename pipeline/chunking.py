"""Token-aware passages with overlap, measured in the embedder's own tokens.

Passages are exact substrings of the document, so what is stored, embedded, BM25-indexed and
reranked is the same text. Both ends of a passage fall between words where the text allows it: a cut
moves back to the last word start within its lookback, and the next passage (which repeats the last
``overlap`` tokens) starts at the first word start inside the overlap, so an overlap never begins
mid-word; it can only get shorter for that, never longer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.config import SettingsError
from pipeline.domain import Document, Passage

if TYPE_CHECKING:
    from pipeline.config import IngestSettings
    from pipeline.embedding import Embedder

BOUNDARY_LOOKBACK = 16  # tokens a cut may move back to land between words


def _word_start(offs: list[tuple[int, int]], i: int) -> bool:
    """Token ``i`` starts a word: white space (or the text's start) comes before it."""
    return i == 0 or offs[i][0] > offs[i - 1][1]


class Chunker:
    def __init__(self, tokenizer: Any, chunk_tokens: int, overlap: int) -> None:
        if overlap >= chunk_tokens:
            raise ValueError(f"chunk overlap ({overlap}) must be below chunk size ({chunk_tokens})")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        return [(int(a), int(b)) for a, b in enc["offset_mapping"] if b > a]

    def _budget(self, title: str) -> int:
        """Title tokens travel with every passage into the embedder, so they share its window."""
        if not title:
            return self.chunk_tokens
        n = len(self.tokenizer(title, add_special_tokens=False, verbose=False)["input_ids"])
        return max(self.chunk_tokens - n - 1, max(16, self.chunk_tokens // 2))

    def split(self, doc: Document) -> list[Passage]:
        text = doc.text.strip()
        if not text:
            return []
        size = self._budget(doc.title)
        offs = self._offsets(text)
        if len(offs) <= size:
            spans = [(0, len(text))]
        else:
            spans = []
            start = 0
            step_overlap = min(self.overlap, size - 1)  # a title may shrink this document's size
            while start < len(offs):
                end = min(start + size, len(offs))
                if end < len(offs):
                    # prefer a cut where the next token starts after a gap (a new word)
                    for cut in range(end, max(start + size // 2, end - BOUNDARY_LOOKBACK), -1):
                        if _word_start(offs, cut):
                            end = cut
                            break
                spans.append((offs[start][0], offs[end - 1][1]))
                if end >= len(offs):
                    break
                nxt = max(end - step_overlap, start + 1)
                while nxt < end and not _word_start(offs, nxt):  # never start inside a word
                    nxt += 1
                start = nxt
        return [
            Passage(
                doc_id=doc.id,
                chunk=i,
                text=text[a:b].strip(),
                title=doc.title,
                metadata=doc.metadata,
            )
            for i, (a, b) in enumerate(spans)
        ]


def chunker_for(embedder: Embedder, settings: IngestSettings) -> Chunker:
    """The chunker of this embedder and the ingest settings (``settings.ingest``): the ingest job
    and the write API cut alike."""
    prompt_tokens = 0
    prompts = getattr(embedder.encoder, "prompts", None) or {}
    if prompts.get("document"):
        prompt_tokens = len(
            embedder.tokenizer(prompts["document"], add_special_tokens=False)["input_ids"]
        )
    limit = embedder.max_seq_length - 2 - prompt_tokens  # [CLS]/[SEP] or BOS/EOS
    size = max(16, min(settings.chunk_tokens, limit))
    if settings.chunk_overlap >= size:
        raise SettingsError(
            f"WINNOW_CHUNK_OVERLAP ({settings.chunk_overlap}) must be below the passage size, "
            f"{size} tokens here (WINNOW_CHUNK_TOKENS capped by the embedder's {limit}-token limit)"
        )
    return Chunker(embedder.tokenizer, size, settings.chunk_overlap)
