# Two commands on a fresh machine (Python 3.11 + pip, nothing else):
#   make run    the main job: a federated run of 4 simulated hospitals on the embedded model
#   make test   the test suite (what CI runs: .ci/run)
# Both create .venv and install the project on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test test-all lint evaluate benchmark clean-venv

# The .pth line makes `flwr run .` in this venv use the venv itself: flwr 1.42
# otherwise installs the app's dependencies (CUDA torch, ~3 GB) into a fresh
# environment with `uv sync` on every run. It only sets a default (an explicit
# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=0 still wins).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -c "import site; open(site.getsitepackages()[0] + '/skinfed_flower_runtime.pth', 'w').write('import os; os.environ.setdefault(\"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION\", \"1\")\n')"
	touch $(STAMP)

## the main job; extra Hydra overrides with ARGS='federation.num_rounds=8 federation.num_hospitals=6'
run: $(STAMP)
	$(BIN)/skinfed-run $(ARGS)

## the default test run (slow end-to-end checks excluded)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## everything, including the slow checks
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .

## the firewall scored on 64 held-out synthetic subjects
evaluate: $(STAMP)
	$(BIN)/privacy-firewall evaluate --n 64 $(ARGS)

benchmark: $(STAMP)
	$(BIN)/privacy-firewall benchmark $(ARGS)
	$(BIN)/python -m scripts.benchmark_calibration

clean-venv:
	rm -rf $(VENV)
