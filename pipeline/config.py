"""One settings object for the whole service: every field is an env var ``WINNOW_<FIELD>`` and a CLI flag.

The fields are grouped by the component that reads them (``settings.store``, ``settings.embed``,
``settings.ingest``, ``settings.search``, ``settings.reranker``, ``settings.api``,
``settings.documents``, ``settings.http``, ``settings.log``), so a component can be handed just its
group. The env names stay flat (``WINNOW_RERANK_MODEL``, not a nested name) and so do the keyword
arguments (``Settings(rerank_model=…)``): :data:`FIELD_GROUP`, generated from the groups, routes each
flat name to its group. Flat attribute reads (``settings.rerank_model``) go through the same mapping
(:meth:`Settings.__getattr__`) until every call site reads its group.

The object is frozen and passed down explicitly; nothing reads the environment behind its back.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.fusion import FusionName, fusion_help

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"

log = logging.getLogger(__name__)

# The choices of each enumerated setting, defined once: components that need them import these.
Analyzer = Literal["standard", "english", "jieba"]
IngestEngine = Literal["single", "ray"]
RerankBackend = Literal["auto", "hf", "vllm", "remote"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Plan = Literal["auto", "padded", "packed"]
Switch = Literal["auto", "on", "off"]
Attention = Literal["auto", "gather", "varlen"]
CpuGemm = Literal["auto", "torch", "onednn"]
Quant = Literal["none", "int8"]
CacheScope = Literal["key", "shared"]
RemoteFormat = Literal["winnow", "cohere", "qwen3-formatted"]
Consistency = Literal["Strong", "Session", "Bounded", "Eventually"]

# Optional settings where an empty string (a blank flag or keyword) means unset.
_EMPTY_IS_UNSET = frozenset(
    {"milvus_token", "api_key", "metrics_api_key", "write_api_key", "rerank_api_key", "ray_address"}
)


class _Group(BaseModel):
    """One component's settings: frozen, validated like the whole; ``title`` heads its docs."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    title: ClassVar[str]

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any, info: ValidationInfo) -> Any:
        return None if v == "" and info.field_name in _EMPTY_IS_UNSET else v


class StoreSettings(_Group):
    """Milvus: connection, deadline and breaker, collection, index, hybrid fusion (the store)."""

    title: ClassVar[str] = "Milvus"

    milvus_uri: str = Field(
        "./data/winnow.db",
        description="A path ending in .db = embedded Milvus Lite; http://host:19530 = Milvus server.",
    )
    milvus_token: SecretStr | None = Field(None, description="Milvus token (user:password).")
    milvus_timeout: float = Field(
        10.0,
        gt=0,
        description="Deadline in seconds of each Milvus call (connect included); a hung Milvus "
        "turns into 503 within it.",
    )
    milvus_max_inflight: int = Field(
        64,
        ge=1,
        description="Milvus calls running at once (each on its own thread); more are refused at "
        "once with 429 rather than queued past their deadline.",
    )
    milvus_breaker_failures: int = Field(
        3,
        ge=1,
        description="Failed Milvus calls in a row (unreachable or past the deadline) that open "
        "the circuit breaker: calls then fail fast with 503 until a background probe succeeds.",
    )
    milvus_breaker_cooldown: float = Field(
        2.0,
        gt=0,
        description="Seconds between the background probes of an open Milvus breaker (the "
        "Retry-After of its 503s).",
    )
    collection: str = Field("winnow", description="Milvus collection name.")
    analyzer: Analyzer = Field(
        "standard",
        description="BM25 analyzer: standard (+lowercase, English stop words), english "
        "(stemming; Milvus server only), jieba (Chinese).",
    )
    hnsw_m: int = Field(16, ge=4, le=64, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, description="HNSW build-time candidate list.")
    hnsw_ef: int = Field(200, ge=8, description="HNSW search-time candidate list (raised to k).")
    fusion: FusionName = Field(  # the names of pipeline.fusion.FUSIONS
        "rrf",
        description=(
            f"How hybrid recall fuses its dense and BM25 lists: {fusion_help()}. See "
            "[docs/evaluation.md](docs/evaluation.md#hybrid-fusion-study)."
        ),
    )
    rrf_k: int = Field(
        5,
        ge=1,
        description=(
            "Reciprocal-rank-fusion constant for hybrid recall (5: chosen on SciFact train, see "
            "[the fusion study](docs/evaluation.md#hybrid-fusion-study))."
        ),
    )
    fusion_dense_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="`weighted` / `normalized` fusion: weight of the dense list (0-1).",
    )
    fusion_bm25_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="`weighted` / `normalized` fusion: weight of the BM25 list (0-1).",
    )
    read_consistency: Consistency = Field(
        "Session",
        description="Milvus consistency level of searches: Session = a search sees every write "
        "this process made before it (read-your-writes); Strong = every write by anyone (use with "
        "several workers or writers on a Milvus server; slower there).",
    )

    @model_validator(mode="after")
    def _fusion_weights(self) -> StoreSettings:
        """Both weights 0 would rank every passage equal: refuse it instead of a silent tie."""
        if self.fusion_dense_weight == 0 and self.fusion_bm25_weight == 0:
            raise ValueError(
                "WINNOW_FUSION_DENSE_WEIGHT and WINNOW_FUSION_BM25_WEIGHT are both 0; "
                "give at least one list a weight above 0 (each 0-1)"
            )
        return self

    @property
    def fusion_label(self) -> str:
        """How hybrid recall fuses, in one phrase: ``rrf k=60``, ``weighted 0.7/0.3`` …"""
        if self.fusion == "rrf":
            return f"rrf k={self.rrf_k}"
        return f"{self.fusion} {self.fusion_dense_weight:g}/{self.fusion_bm25_weight:g}"

    @property
    def is_milvus_lite(self) -> bool:
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "grpc://"))


class EmbedSettings(_Group):
    """The embedder (query and passages)."""

    title: ClassVar[str] = "Embedding"

    embed_model: str = Field(DEFAULT_EMBED_MODEL, description="sentence-transformers id or path.")
    embed_device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps …")
    embed_batch_size: int = Field(32, ge=1, description="Passages per encode forward pass.")


class IngestSettings(_Group):
    """The ingest job: passages, steps, engine."""

    title: ClassVar[str] = "Ingest"

    ingest_batch_size: int = Field(
        512, ge=1, description="Passages per ingest step (embed + upsert); bounds memory."
    )
    chunk_tokens: int = Field(
        256, ge=16, description="Passage length in embedder tokens (capped by the model's limit)."
    )
    chunk_overlap: int = Field(
        32, ge=0, description="Tokens shared by consecutive passages (below WINNOW_CHUNK_TOKENS)."
    )
    ingest_engine: IngestEngine = Field(
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

    @model_validator(mode="after")
    def _chunk_overlap_below_size(self) -> IngestSettings:
        """An overlap as long as the passage would never advance: refuse it, never shrink it."""
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"WINNOW_CHUNK_OVERLAP ({self.chunk_overlap}) must be below WINNOW_CHUNK_TOKENS "
                f"({self.chunk_tokens}): consecutive passages share the overlap, so it has to be "
                "shorter than a passage (e.g. an eighth of it)"
            )
        return self


class SearchSettings(_Group):
    """SearchService defaults and the request bounds of recall."""

    title: ClassVar[str] = "Search"

    top_k: int = Field(50, ge=1, description="Default candidates recalled from Milvus.")
    top_n: int = Field(10, ge=1, description="Default results returned.")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k a request may ask for.")
    max_top_n: int = Field(1000, ge=1, description="Largest top_n a request may ask for.")
    hybrid: bool = Field(
        True, description="Default recall mode: dense + BM25 fused (`WINNOW_FUSION`)."
    )
    search_rerank_budget_ms: int = Field(
        0,
        ge=0,
        description=(
            "Default `rerank_budget_ms` of /v1/search: the best-recalled candidates that the "
            "reranker can score within this many milliseconds (queue included, by its cost model)"
            " are reranked, the rest follow in recall order (marked `reranked=false`) instead of "
            "a 413. 0 = `WINNOW_RERANK_DEADLINE_S`. Unset with the hf reranker on a CPU: 10000."
        ),
    )


class RerankSettings(_Group):
    """The reranker: engine, batcher, cache, long documents, remote and vLLM backends."""

    title: ClassVar[str] = "Reranker"

    rerank: bool = Field(True, description="on / off: rerank recalled candidates.")
    rerank_model: str = Field(DEFAULT_RERANK_MODEL, description="Hub id or local directory.")
    rerank_backend: RerankBackend = Field(
        "auto", description="auto, hf, vllm, remote (a /rerank server at WINNOW_RERANK_URL)."
    )
    rerank_device: str = Field("auto", description="auto, cpu, cuda, cuda:1 …")
    rerank_dtype: Dtype = Field(
        "auto", description="auto = bf16 on GPU / CPUs with bf16 support, else fp32."
    )
    rerank_max_length: int = Field(
        8192,
        ge=64,
        le=32768,
        description=(
            "Tokens per pair; the document is truncated first. Unset with the hf reranker on a "
            "CPU: 2048."
        ),
    )
    rerank_max_batch_tokens: int | None = Field(
        None,
        ge=256,
        description=(
            "Token budget per forward pass, padding counted (unset = tuned: hf 2048 on CPU, 65536"
            " on GPU; packed plan on CPU 32768)."
        ),
    )
    rerank_max_padding: float = Field(
        0.1,
        ge=0,
        description="Padding a batch may carry, as a fraction of its real tokens (past a minimum size).",
    )
    rerank_plan: Plan = Field(
        "auto",
        description="hf engine: auto = packed (padding-free stream) on CUDA, padded on CPU.",
    )
    rerank_compile: Switch = Field(
        "auto",
        description=(
            "hf engine, torch.compile (inductor). Padded plan: the fused decoder's elementwise "
            "kernels and the native attention op (auto = on on a CPU with a C++ compiler; "
            "compiled at load, cached on disk in `TORCHINDUCTOR_CACHE_DIR`). "
            "Packed plan: its whole forward (auto = off until measured to win)."
        ),
    )
    rerank_attention: Attention = Field(
        "auto",
        description="Packed-plan attention kernel: auto = gather; varlen = CUDA flash varlen.",
    )
    rerank_cpu_gemm: CpuGemm = Field(
        "auto",
        description=(
            "hf engine, CPU, fp32: who runs the linear layers. `auto` = oneDNN (prepacked "
            "weights) when it is faster on this CPU, timed at load on the model's MLP shape (2× "
            "MKL on an AVX-512 AMD EPYC), else torch's BLAS; `torch`; `onednn`. bf16 always runs "
            "on oneDNN."
        ),
    )
    rerank_quant: Quant = Field(
        "none",
        description=(
            "hf engine on CPU: `int8` = the decoder's linear layers in int8 (weights per channel, "
            "activations per token; the yes/no LM-head rows stay fp32; `WINNOW_RERANK_DTYPE=auto` "
            "then means fp32 for the rest): faster, scores move "
            "slightly (see [int8 on CPU](#int8-on-cpu)); refused on a GPU and with the vllm or "
            "remote backend. `none` = no quantization."
        ),
    )
    rerank_instruction: str = Field(
        "Given a web search query, retrieve relevant passages that answer the query",
        description="Default Qwen3-Reranker instruction.",
    )
    rerank_max_wait_ms: float = Field(
        2.0, ge=0, description="How long the batcher waits to merge concurrent requests."
    )
    rerank_queue_size: int = Field(
        64, ge=1, description="Requests queued or running in the reranker before 429."
    )
    rerank_queue_tokens: int = Field(
        1_000_000,
        ge=1,
        description=(
            "Estimated tokens (pairs × length, ~3 characters per token, each pair capped at "
            "`WINNOW_RERANK_MAX_LENGTH`) queued for the reranker before 429; a single larger "
            "request gets 413."
        ),
    )
    rerank_slice_tokens: int | None = Field(
        None,
        ge=64,
        description=(
            "Estimated tokens per slice and per engine call: long requests are cut into slices of"
            " documents that interleave round-robin with other requests, so a short request waits"
            " about one slice (unset = the engine's batch budget, at least 8192: 8192 on CPU, "
            "65536 on GPU/vLLM)."
        ),
    )
    rerank_deadline_s: float = Field(
        60.0,
        ge=0,
        description=(
            "A rerank request that cannot finish within this many seconds is refused up front: "
            "413 if it is too big alone (split it), 429 + Retry-After if the queue ahead is the "
            "reason. Each pair's time is predicted from its length by a cost model measured at "
            "start-up and on every engine call ([docs/limits.md](docs/limits.md)). One admitted "
            "that then runs slower than predicted is stopped at the deadline: 503 "
            "`deadline_exceeded` + Retry-After (`/v1/search` answers in recall order). 0 = no "
            "deadline."
        ),
    )
    rerank_cache_mb: int = Field(
        64,
        ge=0,
        description=(
            "Score cache in MiB: an in-process LRU of exact scores keyed by model, instruction, "
            "query and document (about 150 bytes a pair); 0 = off. See [Score "
            "cache](#score-cache)."
        ),
    )
    rerank_cache_scope: CacheScope = Field(
        "key",
        description=(
            "Who shares score-cache entries: key = each API key has its own partition (a cache "
            "hit, visible by its speed, then only tells a caller about its own earlier requests);"
            " shared = every caller (one tenant; more hits). Without `WINNOW_API_KEY` all callers"
            " share one partition. `WINNOW_RERANK_CACHE_MB=0` turns the cache off."
        ),
    )
    rerank_chunks_per_doc: int = Field(
        1,
        ge=1,
        description=(
            "Default `max_chunks_per_doc`: windows a document longer than "
            "`WINNOW_RERANK_MAX_LENGTH` is scored in (its score is the best window's); 1 = cut it"
            " as the model card does."
        ),
    )
    rerank_max_chunks_per_doc: int = Field(
        16, ge=1, description="Largest `max_chunks_per_doc` a request may ask for (422 above)."
    )
    rerank_window_overlap: int = Field(
        256, ge=0, description="Tokens shared by neighbouring windows of a long document."
    )
    rerank_url: str | None = Field(
        None,
        description=(
            "remote backend: the rerank endpoint, e.g. `http://reranker:8000/v1/rerank` or "
            "another Winnow's `http://host:8000/v1/rerank`; a comma-separated list = several "
            "rerankers (least busy first)."
        ),
    )
    rerank_api_key: SecretStr | None = Field(
        None, description="remote backend: Bearer key sent to the rerank server."
    )
    rerank_remote_model: str | None = Field(
        None, description="remote backend: the `model` field sent (unset = not sent)."
    )
    rerank_remote_format: RemoteFormat = Field(
        "winnow",
        description=(
            "remote backend: how the instruction travels: `winnow` (`instruction` field of "
            "Winnow's /v1/rerank), `qwen3-formatted` (query/documents pre-formatted with the "
            "Qwen3 prompt sides: `vllm serve` without `--chat-template`), `cohere` (plain "
            "query/documents: default instruction only). See [Remote reranker](#remote-reranker)."
        ),
    )
    rerank_tokenizer: str = Field(
        "auto",
        description=(
            "remote backend: tokenizer (hub id or directory; only its tokenizer files are "
            "fetched) that cuts each document to `WINNOW_RERANK_MAX_LENGTH` tokens by the model "
            "card's rule before it is sent (`vllm serve` refuses longer prompts: give it "
            "`--max-model-len` ≥ that); `auto` = `WINNOW_RERANK_MODEL`'s for the "
            "`qwen3-formatted` and `cohere` formats, none for `winnow` (the remote Winnow cuts); "
            "`none` = send documents uncut."
        ),
    )
    rerank_remote_timeout: float = Field(
        10.0, gt=0, description="remote backend: seconds per rerank call, retries included."
    )
    rerank_remote_max_documents: int = Field(
        128, ge=1, description="remote backend: documents per HTTP call (longer lists are split)."
    )
    rerank_remote_retries: int = Field(
        3, ge=0, description="remote backend: retries on connection errors, 429, 502-504."
    )
    rerank_remote_breaker_failures: int = Field(
        3,
        ge=1,
        description="remote backend: failed calls in a row (connection errors, timeouts, "
        "502-504) that open the circuit breaker: requests then get 503 at once, without retries.",
    )
    rerank_remote_breaker_cooldown: float = Field(
        2.0,
        gt=0,
        description="remote backend: seconds an open breaker refuses calls before one request "
        "tries the server again (its success closes the breaker).",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="Fraction of GPU memory vLLM may take."
    )

    @model_validator(mode="after")
    def _quant_on_cpu_hf(self) -> RerankSettings:
        """int8 is a CPU mode of the hf engine: refuse it where it would be ignored or fail late."""
        if self.rerank_quant == "none":
            return self
        if self.rerank_backend in ("vllm", "remote"):
            raise ValueError(
                f"WINNOW_RERANK_QUANT={self.rerank_quant} is a CPU mode of the hf engine; the "
                f"{self.rerank_backend} backend quantizes (or not) on its own side: set "
                "WINNOW_RERANK_BACKEND=hf (or auto), or WINNOW_RERANK_QUANT=none"
            )
        if self.rerank_device != "auto" and self.rerank_device != "cpu":
            raise ValueError(
                f"WINNOW_RERANK_QUANT={self.rerank_quant} runs on CPU only: set "
                f"WINNOW_RERANK_DEVICE=cpu (not {self.rerank_device!r}), or "
                "WINNOW_RERANK_QUANT=none"
            )
        if self.rerank_plan == "packed":
            raise ValueError(
                f"WINNOW_RERANK_QUANT={self.rerank_quant} runs on the padded plan: set "
                "WINNOW_RERANK_PLAN=auto or padded"
            )
        return self


class ApiSettings(_Group):
    """The API's keys and the size limits of its requests."""

    title: ClassVar[str] = "API keys and request limits"

    api_key: SecretStr | None = Field(
        None,
        description=(
            "Bearer key of the API (/v1, /v2); several comma-separated keys = one per client "
            "(each its own score-cache partition, `WINNOW_RERANK_CACHE_SCOPE`) or for rotation; "
            "unset = open."
        ),
    )
    metrics_api_key: SecretStr | None = Field(
        None,
        description="Bearer key of /metrics (give it to the Prometheus scraper); unset = the API "
        "key(s) when set, else /metrics is open.",
    )
    write_api_key: SecretStr | None = Field(
        None,
        description="Bearer key of the write routes (POST/DELETE /v1/documents); it reads too. "
        "A read key (WINNOW_API_KEY) gets 403 there. Also the key `python -m ingest --server` "
        "sends.",
    )
    max_documents: int = Field(1000, ge=1, description="Documents per rerank request (413).")
    max_query_chars: int = Field(4096, ge=1, description="Longest query accepted (chars).")
    max_document_chars: int = Field(
        100_000, ge=1, description="Longer documents are truncated (or 422 with truncate=false)."
    )
    max_instruction_chars: int = Field(
        2048, ge=1, description="Longest reranker instruction accepted (chars, else 422)."
    )
    max_filter_chars: int = Field(4096, ge=1, description="Longest filter expression (chars).")

    @model_validator(mode="after")
    def _keys_not_blank(self) -> ApiSettings:
        """A key setting of only commas and spaces would leave the API open while saying it is not."""
        if self.api_key is not None and not self.api_keys:
            raise ValueError("WINNOW_API_KEY holds no key (only commas or spaces)")
        if self.metrics_api_key is not None and not self.metrics_api_key.get_secret_value().strip():
            raise ValueError("WINNOW_METRICS_API_KEY is blank")
        return self

    @property
    def api_keys(self) -> list[str]:
        """The API keys (``WINNOW_API_KEY``, comma-separated); empty = the API is open."""
        if self.api_key is None:
            return []
        return [k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip()]

    @property
    def metrics_keys(self) -> list[str]:
        """Keys that open /metrics: the metrics key when set, else the API keys; empty = open."""
        if self.metrics_api_key is not None:
            return [self.metrics_api_key.get_secret_value()]
        return self.api_keys


class WriteSettings(_Group):
    """The write routes (POST/DELETE /v1/documents) and their queue."""

    title: ClassVar[str] = "Write API"

    writes: Switch = Field(
        "auto",
        description="Write routes: auto = on only with WINNOW_WRITE_API_KEY; on = also without "
        "one (a local single-user server: whoever may search may write); off = always off.",
    )
    max_write_documents: int = Field(
        256, ge=1, description="Documents per POST /v1/documents or batch delete (413)."
    )
    write_queue_size: int = Field(
        8, ge=1, description="Write requests running or waiting (one runs at a time) before 429."
    )
    write_queue_chars: int = Field(
        8_000_000,
        ge=1,
        description="Characters of document text admitted to the write queue before 429 (the "
        "embedding work); one larger request gets 413.",
    )
    write_embed_slice: int = Field(
        4,
        ge=1,
        description="Passages a write embeds per step; waiting searches embed before the next "
        "step (up to 4 in a row), so a search waits for at most one step.",
    )


class HttpSettings(_Group):
    """uvicorn: bind address, workers, connection and body limits."""

    title: ClassVar[str] = "HTTP server"

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Bind port.")
    workers: int = Field(1, ge=1, description="uvicorn workers (1 per Milvus Lite file).")
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest request body (413 before it is read or parsed).",
    )
    http_header_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds a new connection may take to send its first request's headers "
        "(then it is closed).",
    )
    http_body_timeout: float = Field(
        30.0, gt=0, description="Seconds a request body may stall between chunks (408)."
    )
    http_keep_alive: float = Field(5.0, gt=0, description="Idle keep-alive seconds per connection.")
    http_max_concurrency: int = Field(
        1024,
        ge=1,
        description=(
            "Requests in progress at once; more get 429 with Retry-After. Idle connections do not"
            " count, and `/health`, `/ready` and `/metrics` are never refused."
        ),
    )
    http_max_connections: int = Field(
        4096,
        ge=1,
        description="Open client connections per process; past it a new connection closes the "
        "oldest one with no request in progress. The server raises its open-files limit to fit.",
    )


class LogSettings(_Group):
    """Logging."""

    title: ClassVar[str] = "Logging"

    log_level: str = Field("INFO", description="Python logging level.")


# The groups by attribute name, in the order of the docs; ``Settings`` has one field per entry.
GROUPS: dict[str, type[_Group]] = {
    "store": StoreSettings,
    "embed": EmbedSettings,
    "ingest": IngestSettings,
    "search": SearchSettings,
    "reranker": RerankSettings,
    "api": ApiSettings,
    "documents": WriteSettings,
    "http": HttpSettings,
    "log": LogSettings,
}

# The one generated mapping from a flat setting name (``rerank_model``, env ``WINNOW_RERANK_MODEL``)
# to its group: keyword arguments, ``model_copy(update=…)``, env reading, flat reads, CLI flags and
# the docs all go through it.
FIELD_GROUP: dict[str, str] = {
    name: group for group, cls in GROUPS.items() for name in cls.model_fields
}
# Every setting's field, by flat name (what ``Settings.model_fields`` was before the grouping).
FIELDS: dict[str, FieldInfo] = {
    name: GROUPS[group].model_fields[name] for name, group in FIELD_GROUP.items()
}
# Flat reads also reach a group's public properties (``settings.api_keys``, ``settings.fusion_label``).
_READ_GROUP: dict[str, str] = FIELD_GROUP | {
    name: group
    for group, cls in GROUPS.items()
    for name, value in vars(cls).items()
    if isinstance(value, property) and not name.startswith("_")
}
assert not set(GROUPS) & set(_READ_GROUP), "a group is named like a setting"


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keyword arguments (``rerank_model=…``) routed into their groups' dicts; a group given
    whole (``reranker=RerankSettings(…)``) is kept, with flat names for it applied over it."""
    out: dict[str, Any] = {}
    flat: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        group = FIELD_GROUP.get(key)
        if group is None:
            out[key] = value  # a group, or a name pydantic handles (ignored when unknown)
        else:
            flat.setdefault(group, {})[key] = value
    for group, fields in flat.items():
        given = out.get(group)
        if isinstance(given, BaseModel):
            given = given.model_dump()
        out[group] = {**(given or {}), **fields}
    return out


class _FlatEnvSource(PydanticBaseSettingsSource):
    """``WINNOW_<FIELD>`` for every group's fields, parsed as pydantic-settings parses a flat
    model, and nested under the group: the env names do not change with the grouping."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        config = settings_cls.model_config
        self._sources = {
            group: EnvSettingsSource(
                cls,  # type: ignore[arg-type]  # a plain model: only its fields are read
                case_sensitive=config.get("case_sensitive"),
                env_prefix=config.get("env_prefix"),
                env_ignore_empty=config.get("env_ignore_empty"),
            )
            for group, cls in GROUPS.items()
        }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every group at once

    def __call__(self) -> dict[str, Any]:
        out = {}
        for group, source in self._sources.items():
            values = source()
            if values:
                out[group] = values
        return out


class Settings(BaseSettings):
    """Winnow settings, one group per component. Env names are part of the public interface: keep
    the spellings."""

    model_config = SettingsConfigDict(
        env_prefix="WINNOW_",
        frozen=True,
        extra="ignore",
        env_file=None,
        env_ignore_empty=True,  # a blank line in .env means "default", not an invalid value
        validate_default=True,
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    reranker: RerankSettings = Field(default_factory=RerankSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    documents: WriteSettings = Field(default_factory=WriteSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    def __init__(self, **values: Any) -> None:
        super().__init__(**_nest(values))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments over the flat ``WINNOW_*`` environment (no .env file, no secrets dir)."""
        return (init_settings, _FlatEnvSource(settings_cls))

    def __getattr__(self, name: str) -> Any:
        """Flat reads (``settings.rerank_model`` = ``settings.reranker.rerank_model``), through
        :data:`FIELD_GROUP`. Kept while call sites move to their groups; delete this method (and
        ``_READ_GROUP``) to drop them."""
        group = _READ_GROUP.get(name)
        if group is not None:
            values = self.__dict__
            if group in values:
                return getattr(values[group], name)
        return super().__getattr__(name)  # type: ignore[misc]

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Settings:
        """A copy with flat names (``update={"rerank_deadline_s": 0}``) applied to their groups.

        Like pydantic's ``model_copy``, the update is not validated.
        """
        if not update:
            return super().model_copy(deep=deep)
        nested = _nest(update)
        for group in GROUPS:
            if isinstance(nested.get(group), dict):
                nested[group] = getattr(self, group).model_copy(update=nested[group])
        return super().model_copy(update=nested, deep=deep)

    @property
    def writes_enabled(self) -> bool:
        """The write routes answer: explicitly on, or a write key is set (and not forced off)."""
        writes = self.documents.writes
        return writes == "on" or (writes == "auto" and self.api.write_api_key is not None)

    def flat_items(self) -> Iterator[tuple[str, FieldInfo, Any]]:
        """(flat name, field, value) of every setting, group by group."""
        for name, group in FIELD_GROUP.items():
            yield name, FIELDS[name], getattr(self.__dict__[group], name)

    def non_default(self) -> dict[str, Any]:
        """Settings that differ from their defaults, secrets redacted: logged at startup."""
        out: dict[str, Any] = {}
        for name, field, value in self.flat_items():
            if value != field.default:
                out[name] = "***" if isinstance(value, SecretStr) else value
        return out

    def to_env(self) -> dict[str, str]:
        """``WINNOW_*`` variables that rebuild this object in another process, secrets included.

        ``--workers N`` starts fresh processes that read only the environment: a setting given as a
        CLI flag (the API key above all) must reach every one of them.
        """
        env: dict[str, str] = {}
        for name, field, value in self.flat_items():
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


# WINNOW_* variables read by the project's own tooling rather than by Settings (tests, benchmarks,
# docker compose): known, so never reported as misspellings.
TOOLING_ENV = frozenset(
    {
        "WINNOW_DATA_DIR",
        "WINNOW_SHARED_DIR",
        "WINNOW_REQUIRE_VLLM",
        "WINNOW_VLLM_PYTHON",
        "WINNOW_CHROMIUM",
        "WINNOW_SCHEMATHESIS_EXAMPLES",
    }
)


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``WINNOW_*`` variables that are no setting, each with the closest setting's name (or None).

    pydantic-settings ignores unknown names (``extra="ignore"``), so ``WINNOW_TOPK=5`` would
    otherwise change nothing without a word.
    """
    known = sorted(name.upper() for name in FIELDS)
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("WINNOW_") or upper in TOOLING_ENV:
            continue
        rest = upper.removeprefix("WINNOW_")
        if rest in known:
            continue
        close = difflib.get_close_matches(
            rest, known, n=1, cutoff=0.6
        )  # the prefix would match all
        out.append((name, f"WINNOW_{close[0]}" if close else None))
    return out


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> None:
    """Log a warning per ``WINNOW_*`` variable that sets nothing (every CLI command does, at start)."""
    for name, hint in unknown_env(os.environ if environ is None else environ):
        log.warning(
            "%s is not a Winnow setting and is ignored%s",
            name,
            f"; did you mean {hint}?" if hint else " (README lists the settings)",
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
    groups = {
        group: parser.add_argument_group(f"settings: {cls.title} (also WINNOW_<NAME> env vars)")
        for group, cls in GROUPS.items()
    }
    for name, field in FIELDS.items():
        if only is not None and name not in only:
            continue
        group = groups[FIELD_GROUP[name]]
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


class SettingsError(ValueError):
    """Settings that do not validate; ``str(exc)`` names each setting (env var and flag) and why."""


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid setting, named the way a user sets it (``WINNOW_X`` / ``--x``)."""
    lines = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = tuple(err.get("loc") or ())
        if loc and loc[0] in GROUPS:  # a group's field, or (loc = the group alone) its validator
            loc = loc[1:]
        if loc:
            name = str(loc[0])
            where = f"WINNOW_{name.upper()} (--{name.replace('_', '-')})"
            lines.append(f"{where}: {msg} (got {err.get('input')!r})")
        else:
            lines.append(msg)
    return "; ".join(lines)


def settings_from_args(ns: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the CLI flags over the environment; invalid values raise SettingsError."""
    overrides = {
        k.removeprefix("setting_"): v
        for k, v in vars(ns).items()
        if k.startswith("setting_") and v is not None
    }
    overrides.update({k: v for k, v in extra.items() if v is not None})
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None


def settings_or_exit(
    parser: argparse.ArgumentParser, ns: argparse.Namespace, **extra: Any
) -> Settings:
    """:func:`settings_from_args` for a CLI: invalid settings exit 2 with one line, no traceback;
    misspelt ``WINNOW_*`` names are warned about first."""
    warn_unknown_env()
    try:
        return settings_from_args(ns, **extra)
    except SettingsError as exc:
        parser.error(f"invalid settings: {exc}")
