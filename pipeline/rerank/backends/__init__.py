"""Reranker backends: ``hf`` (transformers), ``vllm`` and ``remote``; picked by the factory."""
