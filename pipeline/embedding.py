"""Embedder over sentence-transformers: L2-normalised float32, query vs document prompts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.devices import resolve_device
from pipeline.model_files import resolve_model

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


log = logging.getLogger(__name__)
FOREGROUND_TURNS = 4  # foreground embeds that may overtake a waiting background one


class Embedder:
    """Wraps a SentenceTransformer; models that define ``query``/``document`` prompts get them."""

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 32) -> None:
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self._model: SentenceTransformer | None = None
        # one forward at a time (torch CPU threads are shared anyway); background work (a write's
        # slices) waits while any foreground embed (a search's query) waits: searches go first
        self._gate = threading.Condition()
        self._busy = False
        self._waiting = 0  # foreground calls waiting
        self._bg_waiting = 0  # background calls waiting
        self._bg_turns = 0  # foreground calls since the last background one (capped)

    def load(self) -> Embedder:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = resolve_model(
                self.model_name, what="embedding model", setting="WINNOW_EMBED_MODEL"
            )
            self.device = resolve_device(self.device)
            self._model = SentenceTransformer(path, device=self.device)
            log.info(
                "embedder %s on %s (dim %d, max %d tokens)",
                self.model_name,
                self.device,
                self.dim,
                self.max_seq_length,
            )
        return self

    @property
    def encoder(self) -> SentenceTransformer:
        """The loaded SentenceTransformer (``model_name`` is the id it was loaded from)."""
        if self._model is None:
            raise RuntimeError("Embedder.load() has not been called")
        return self._model

    @property
    def dim(self) -> int:
        get_dim = getattr(self.encoder, "get_embedding_dimension", None) or (
            self.encoder.get_sentence_embedding_dimension
        )
        return int(get_dim())

    @property
    def max_seq_length(self) -> int:
        return int(self.encoder.max_seq_length)

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer

    def _prompt_name(self, query: bool) -> str | None:
        prompts = getattr(self.encoder, "prompts", None) or {}
        name = "query" if query else "document"
        return name if prompts.get(name) else None

    def _acquire(self, background: bool) -> None:
        """Foreground first, but not for ever: a waiting background call gets its turn after at
        most FOREGROUND_TURNS foreground calls (searches wait one slice; writes still progress)."""
        with self._gate:
            if background:
                self._bg_waiting += 1
            else:
                self._waiting += 1
            try:
                while self._busy or (
                    self._bg_turns < FOREGROUND_TURNS and self._waiting
                    if background
                    else self._bg_waiting and self._bg_turns >= FOREGROUND_TURNS
                ):
                    self._gate.wait()
            finally:
                if background:
                    self._bg_waiting -= 1
                else:
                    self._waiting -= 1
            if background:
                self._bg_turns = 0
            else:
                self._bg_turns = min(self._bg_turns + 1, FOREGROUND_TURNS)
            self._busy = True

    def _release(self) -> None:
        with self._gate:
            self._busy = False
            self._gate.notify_all()

    def embed(self, texts: Sequence[str], *, query: bool, background: bool = False) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text.

        ``background``: yield to foreground calls waiting, up to FOREGROUND_TURNS in a row (the
        write API embeds its passages in small background calls, so a search's query waits for at
        most one of them, and writes still progress under a steady search load).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._acquire(background)
        try:
            out = self.encoder.encode(
                list(texts),
                prompt_name=self._prompt_name(query),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        finally:
            self._release()
        return np.asarray(out, dtype=np.float32)
