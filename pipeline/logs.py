"""Logging set-up shared by the CLIs and the service."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # grpc._server: Milvus Lite logs pymilvus's optional AllocTimestamp probe as an error
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    for noisy in (
        "httpx",
        "urllib3",
        "huggingface_hub",
        "sentence_transformers",
        "pymilvus",
        "faiss",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pymilvus logs every failed RPC at ERROR with its whole request and a traceback: a client's 10 MB
    # filter would be copied into the log, whole, per request. The store reports failures itself.
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
