# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv/ and install the project into it first (pip caches make later runs fast).
# TORCH picks the PyTorch build: the default pins the release this project is tested with;
# use e.g. `make demo TORCH=torch` for the newest, or a CUDA-specific wheel.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test test-export install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) jobs/pipeline.py

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

# GGUF files checked in llama.cpp itself: llama-cpp-python builds llama.cpp from source (about 5 minutes
# on 2 cores, once; pip caches the wheel), so it is a target of its own, which .ci/run also runs.
test-export: install
	$(PY) -m pip install --quiet -e ".[llama-cpp]"
	$(PY) -m pytest -m llama_cpp tests/test_gguf.py

clean:
	rm -rf $(VENV) checkpoints mlruns ray_results bench/results
