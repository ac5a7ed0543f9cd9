# Winnow: `make demo` (set up + ingest the sample corpus + search) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines: install a CPU build of torch first (pip's default torch pulls several GB of CUDA).
TORCH ?= torch==2.13.0
QUERY ?= how do plants make oxygen from sunlight?

.PHONY: install demo crosslingual serve test lint bench-rerank bench-query clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ingest examples/sample
	$(PY) -m pipeline search "$(QUERY)" --top-n 5

crosslingual: install
	$(PY) examples/crosslingual/run.py

serve: install
	$(PY) -m pipeline serve

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf data/ .pytest_cache
