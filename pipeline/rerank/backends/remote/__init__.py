"""The remote backend: any /rerank HTTP server (``formats``: wire bodies; ``client``: endpoints,
backoff; ``reranker``: :class:`~pipeline.rerank.backends.remote.reranker.RemoteReranker`)."""
