"""The chunker lives in :mod:`pipeline.chunking` (the write API cuts documents the same way)."""

from pipeline.chunking import BOUNDARY_LOOKBACK, Chunker, chunker_for

__all__ = ["BOUNDARY_LOOKBACK", "Chunker", "chunker_for"]
