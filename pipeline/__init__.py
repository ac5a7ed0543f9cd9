"""Winnow: two-stage semantic search (Milvus recall + Qwen3-Reranker)."""

__version__ = "0.1.0"
