# The two commands a fresh clone needs: `make demo` and `make test`.
# The virtual environment lives outside the clone, keyed by the dependency hash, and the Kafka
# jars and the tiny base model are cached beside it, so a second run skips all of that.

PYTHON ?= python3
export LORALEDGER_CACHE ?= $(HOME)/.cache/loraledger
export LORALEDGER_HOME ?= $(CURDIR)/.loraledger
DEPS_HASH := $(shell $(PYTHON) infra/deps_hash.py pyproject.toml)
VENV := $(LORALEDGER_CACHE)/venv-$(DEPS_HASH)
VPY := $(VENV)/bin/python
LORALEDGER := $(VPY) -m loraledger.cli
INSTALLED := $(LORALEDGER_HOME)/.installed-$(DEPS_HASH)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-chaos lint bench stack-up stack-down clean

venv: $(INSTALLED)

$(VENV)/.deps-ready:
	@echo "creating the environment in $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(VPY) -m pip install --quiet --prefer-binary -e '.[dev]'
	touch $@

# The environment is shared by every clone; the project itself is installed editable from
# this clone, so each clone re-points it once.
$(INSTALLED): $(VENV)/.deps-ready
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	mkdir -p $(LORALEDGER_HOME) && touch $@

stack-up: venv
	$(LORALEDGER) stack up

stack-down: venv
	$(LORALEDGER) stack down

demo: venv
	$(LORALEDGER) demo

# The whole suite, integration tests included, against the broker this target starts.
test: venv lint
	$(LORALEDGER) stack up
	$(VPY) -m pytest -m "not gpu and not chaos" $(PYTEST_ARGS); status=$$?; \
	$(LORALEDGER) stack down; exit $$status

# The chaos scenario as a test (4-8 minutes on 2 cores; it starts its own cluster, so no stack
# is needed). Kept out of `make test` to hold the suite well under 30 minutes.
test-chaos: venv
	$(VPY) -m pytest -m chaos $(PYTEST_ARGS)

test-fast: venv
	$(VPY) -m pytest -m "not gpu and not integration and not slow" $(PYTEST_ARGS)

# ruff, and the layer order of pyproject's import contract (an upward import fails).
lint: venv
	$(VPY) -m ruff check .
	$(VENV)/bin/lint-imports

bench: venv
	$(VPY) bench/multi_lora.py
	$(VPY) bench/real_model.py
	$(VPY) bench/ledger.py

clean:
	$(LORALEDGER) stack down || true
	rm -rf $(LORALEDGER_HOME)
