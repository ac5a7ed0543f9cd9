"""The passage store: re-exports only (the code lives in the modules of this package)."""

from pipeline.store.milvus import (
    InvalidFilter,
    MilvusStore,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreInUse,
    StoreUnavailable,
    in_list,
    quote,
)

__all__ = [
    "InvalidFilter",
    "MilvusStore",
    "SchemaMismatch",
    "StoreBusy",
    "StoreError",
    "StoreInUse",
    "StoreUnavailable",
    "in_list",
    "quote",
]
