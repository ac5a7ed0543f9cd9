"""The passage store: re-exports only (the code lives in the modules of this package).

``base`` (the contract), ``errors``, ``filters``, ``connection`` (deadline, reconnect, breaker),
``lite`` (Milvus Lite's quirks, installed on use), ``milvus`` (schema and CRUD), ``search``.
"""

from pipeline.store.base import VectorStore
from pipeline.store.errors import (
    InvalidFilter,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreInUse,
    StoreUnavailable,
)
from pipeline.store.filters import in_list, quote
from pipeline.store.milvus import MilvusStore

__all__ = [
    "InvalidFilter",
    "MilvusStore",
    "SchemaMismatch",
    "StoreBusy",
    "StoreError",
    "StoreInUse",
    "StoreUnavailable",
    "VectorStore",
    "in_list",
    "quote",
]
