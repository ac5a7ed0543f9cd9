"""One settings object for the whole service: every field is an env var ``WINNOW_<FIELD>`` and a CLI flag.

The object is frozen and passed down explicitly; nothing reads the environment behind its back.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"

log = logging.getLogger(__name__)


class Settings(BaseSettings):
    """Winnow settings. Env names are part of the public interface: keep the spellings."""

    model_config = SettingsConfigDict(
        env_prefix="WINNOW_",
        frozen=True,
        extra="ignore",
        env_file=None,
        env_ignore_empty=True,  # a blank line in .env means "default", not an invalid value
        validate_default=True,
    )

    # --- Milvus -----------------------------------------------------------------------------
    milvus_uri: str = Field(
        "./data/winnow.db",
        description="A path ending in .db = embedded Milvus Lite; http://host:19530 = Milvus server.",
    )
    milvus_token: SecretStr | None = Field(None, description="Milvus token (user:password).")
    milvus_timeout: float = Field(10.0, gt=0, description="Seconds before a Milvus call fails.")
    collection: str = Field("winnow", description="Milvus collection name.")
    analyzer: Literal["standard", "english", "jieba"] = Field(
        "standard",
        description="BM25 analyzer: standard (+lowercase, English stop words), english "
        "(stemming; Milvus server only), jieba (Chinese).",
    )
    hnsw_m: int = Field(16, ge=4, le=64, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, description="HNSW build-time candidate list.")
    hnsw_ef: int = Field(200, ge=8, description="HNSW search-time candidate list (raised to k).")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank-fusion constant for hybrid recall.")

    # --- Embedding / ingest -------------------------------------------------------------------
    embed_model: str = Field(DEFAULT_EMBED_MODEL, description="sentence-transformers id or path.")
    embed_device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps …")
    embed_batch_size: int = Field(32, ge=1, description="Passages per encode forward pass.")
    ingest_batch_size: int = Field(
        512, ge=1, description="Passages per ingest step (embed + upsert); bounds memory."
    )
    chunk_tokens: int = Field(
        256, ge=16, description="Passage length in embedder tokens (capped by the model's limit)."
    )
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive passages.")
    ingest_engine: Literal["single", "ray"] = Field(
        "single",
        description="Ingest engine: single (this process) or ray (Ray Data embedder actors; "
        "pip install 'winnow[ray]').",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (auto = the cluster this node is in, or head:6379); "
        "unset = start a local Ray.",
    )
    ray_actors: int = Field(
        1, ge=1, description="Embedder actors of the Ray engine (a model each)."
    )
    ray_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per Ray embedder actor (0 = CPU actors; 0.5 = two per GPU)."
    )

    # --- Search ---------------------------------------------------------------------------------
    top_k: int = Field(50, ge=1, description="Default candidates recalled from Milvus.")
    top_n: int = Field(10, ge=1, description="Default results returned.")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k a request may ask for.")
    max_top_n: int = Field(1000, ge=1, description="Largest top_n a request may ask for.")
    hybrid: bool = Field(True, description="Default recall mode: dense + BM25 fused with RRF.")

    # --- Reranker -------------------------------------------------------------------------------
    rerank: bool = Field(True, description="on / off: rerank recalled candidates.")
    rerank_model: str = Field(DEFAULT_RERANK_MODEL, description="Hub id or local directory.")
    rerank_backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto, hf, vllm.")
    rerank_device: str = Field("auto", description="auto, cpu, cuda, cuda:1 …")
    rerank_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 on GPU / CPUs with bf16 support, else fp32."
    )
    rerank_max_length: int = Field(
        8192, ge=64, le=32768, description="Tokens per pair; the document is truncated first."
    )
    rerank_max_batch_tokens: int | None = Field(
        None, ge=256, description="Token budget per forward pass, padding counted (unset = tuned)."
    )
    rerank_max_padding: float = Field(
        0.1,
        ge=0,
        description="Padding a batch may carry, as a fraction of its real tokens (past a minimum size).",
    )
    rerank_instruction: str = Field(
        "Given a web search query, retrieve relevant passages that answer the query",
        description="Default Qwen3-Reranker instruction.",
    )
    rerank_max_wait_ms: float = Field(
        2.0, ge=0, description="How long the batcher waits to merge concurrent requests."
    )
    rerank_queue_size: int = Field(
        64, ge=1, description="Requests waiting for the reranker before 429."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="Fraction of GPU memory vLLM may take."
    )

    # --- HTTP -----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Bind port.")
    workers: int = Field(1, ge=1, description="uvicorn workers (1 per Milvus Lite file).")
    api_key: SecretStr | None = Field(None, description="Bearer key; unset = open.")
    max_documents: int = Field(1000, ge=1, description="Documents per rerank request (413).")
    max_query_chars: int = Field(4096, ge=1, description="Longest query accepted (chars).")
    max_document_chars: int = Field(
        100_000, ge=1, description="Longer documents are truncated (or 422 with truncate=false)."
    )

    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("milvus_token", "api_key", "ray_address", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if v == "" else v

    @property
    def is_milvus_lite(self) -> bool:
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "grpc://"))

    def non_default(self) -> dict[str, Any]:
        """Settings that differ from their defaults, secrets redacted: logged at startup."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value != field.default:
                out[name] = "***" if isinstance(value, SecretStr) else value
        return out

    def to_env(self) -> dict[str, str]:
        """``WINNOW_*`` variables that rebuild this object in another process, secrets included.

        ``--workers N`` starts fresh processes that read only the environment: a setting given as a
        CLI flag (the API key above all) must reach every one of them.
        """
        env: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.default:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"WINNOW_{name.upper()}"] = str(value)
        return env

    def log_non_default(self) -> None:
        items = self.non_default()
        log.info(
            "settings: %s",
            ", ".join(f"{k}={v!r}" for k, v in items.items()) if items else "all defaults",
        )


def _flag_type(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) is not None and args else annotation
    if get_origin(base) is Literal:
        return str
    if base in (int, float):
        return base
    return str


def add_settings_arguments(parser: argparse.ArgumentParser, only: list[str] | None = None) -> None:
    """Expose settings fields as ``--field-name`` flags; unset flags fall back to env/defaults."""
    group = parser.add_argument_group("settings (also WINNOW_<NAME> env vars)")
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        if flag in parser._option_string_actions:  # the command defines its own flag
            continue
        kwargs: dict[str, Any] = {"dest": f"setting_{name}", "default": None}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _flag_type(field.annotation)
            kwargs["metavar"] = name.upper()
        args = get_args(field.annotation)
        choices = args if get_origin(field.annotation) is Literal else None
        if choices:
            kwargs["choices"] = choices
        group.add_argument(flag, help=field.description, **kwargs)


def settings_from_args(ns: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        k.removeprefix("setting_"): v
        for k, v in vars(ns).items()
        if k.startswith("setting_") and v is not None
    }
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return Settings(**overrides)
