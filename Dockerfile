# syntax=docker/dockerfile:1
# Winnow api/ingest image.
#
#   GPU (default): docker build -t winnow:gpu .
#                  CUDA runtime base + the project with the `gpu` extra (vLLM). The torch/vLLM wheels
#                  from PyPI bring their own CUDA user-space libraries; the host needs an NVIDIA driver
#                  new enough for them and the NVIDIA Container Toolkit.
#   CPU:           docker build -t winnow:cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=ubuntu:24.04 .
#                  plain Ubuntu base, CPU-only torch from the PyTorch CPU index, no vLLM.
#
# Both variants run `python -m pipeline serve` by default; the ingest job is
# `docker run … winnow:gpu python -m ingest /data` (or the `ingest` compose profile).

ARG CUDA_VERSION=12.9.1
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04

FROM ${BASE_IMAGE}

# gpu: install the project with the `gpu` extra (vLLM); cpu: CPU torch wheel, no extra.
ARG VARIANT=gpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04 ships Python 3.12. The GPU variant also gets a C compiler and the Python headers:
# Triton (used by vLLM) compiles a small launcher stub at run time. The CPU variant gets a C++
# compiler and the headers: the reranker's fused kernels (inductor) and its native attention op are
# compiled at the first start (WINNOW_RERANK_COMPILE=auto; without a compiler: eager kernels and
# torch's attention, ~15% slower in bf16), cached in TORCHINDUCTOR_CACHE_DIR on the /models volume.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && if [ "$VARIANT" = "gpu" ]; then \
         apt-get install -y --no-install-recommends gcc libc6-dev python3-dev; \
       else \
         apt-get install -y --no-install-recommends g++ libc6-dev python3-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src

# Dependencies first (a layer that survives source edits): install against empty package stubs,
# then drop the stub install and add the real sources below.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p pipeline ingest \
    && touch pipeline/__init__.py ingest/__init__.py \
    && case "$VARIANT" in \
         gpu) pip install ".[gpu]" ;; \
         cpu) pip install --index-url "$TORCH_CPU_INDEX" torch && pip install . ;; \
         *) echo "VARIANT must be 'gpu' or 'cpu', got '$VARIANT'" >&2; exit 1 ;; \
       esac \
    && pip uninstall -y winnow

COPY pipeline ./pipeline
COPY ingest ./ingest
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src

# Non-root user; /app is its home and working directory (./data/winnow.db, the Milvus Lite default,
# lands in /app/data). /models holds the Hugging Face cache and other model caches: mount a volume
# there so weights are downloaded once.
RUN groupadd --system --gid 10001 winnow \
    && useradd --system --uid 10001 --gid winnow --home-dir /app --shell /usr/sbin/nologin winnow \
    && mkdir -p /app/data /models \
    && chown -R winnow:winnow /app /models

ENV HF_HOME=/models \
    XDG_CACHE_HOME=/models/cache \
    TORCHINDUCTOR_CACHE_DIR=/models/cache/torchinductor \
    WINNOW_HOST=0.0.0.0 \
    WINNOW_PORT=8000

VOLUME ["/models"]
WORKDIR /app
USER winnow

EXPOSE 8000

# Liveness: GET /health on the port the app binds (WINNOW_PORT). The long start period covers the
# first start, which downloads the models and starts vLLM before the server listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WINNOW_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "pipeline", "serve"]
