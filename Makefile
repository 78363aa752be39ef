# kat-research: every target installs what it needs into .venv first.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint demo bench clean

# Creates .venv; installs the CPU torch wheel first (otherwise pip pulls a multi-GB CUDA
# build), then the package with its dev extra. The stamp makes re-runs a no-op until
# pyproject.toml changes.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check kat_research tests scripts

bench: install
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_loss_memory.py

clean:
	rm -rf $(VENV) outputs multirun
