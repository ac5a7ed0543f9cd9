"""Reranking. The contract is :mod:`pipeline.rerank.base`; the backends live in
:mod:`pipeline.rerank.backends` (``hf`` and ``vllm`` engines behind the micro-batcher of
:mod:`pipeline.rerank.batcher`, ``remote`` for any /rerank server); :mod:`pipeline.rerank.factory`
builds the configured one and only the composition root (``pipeline/runtime.py``) calls it.

Nothing is imported here: ``import pipeline.rerank`` loads no backend, torch or vllm.
"""
