# `make demo` and `make test` are all a newcomer needs: both create .venv and
# install into it on first use (and again when pyproject.toml changes). `make demo`
# installs only blobplane itself; the other targets add the dev, bench and docs tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_INSTALLED := $(VENV)/.installed-demo
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# Where `make bench` writes its JSON, one folder per day (UTC).
RESULTS := bench/results/$(shell date -u +%F)
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint typecheck layering unit docs docs-strict bench clean

$(DEMO_INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(DEMO_INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev,bench,docs]'
	touch $(INSTALLED)

# The channel demo, then frames through a pool to subscribers, then the broker.
demo: $(DEMO_INSTALLED)
	$(BIN)/blobplane demo
	$(BIN)/blobplane demo --stream --seconds 5
	$(BIN)/blobplane demo-broker

lint: $(INSTALLED)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(INSTALLED)
	$(BIN)/mypy

# Each layer imports only the ones below it (the contract is in pyproject.toml).
layering: $(INSTALLED)
	$(BIN)/lint-imports --no-cache

unit: $(INSTALLED)
	$(BIN)/pytest

# The documentation site (mkdocs.yml), into site/. `make test` builds it with --strict:
# a broken link, anchor or API reference fails.
docs: $(INSTALLED)
	$(BIN)/mkdocs build

docs-strict: $(INSTALLED)
	$(BIN)/mkdocs build --strict --quiet

test: lint typecheck layering unit docs-strict

# Every benchmark writes its JSON to $(RESULTS); bench/report.py then renders the tables
# of docs/performance.md and the README's headline figures from it.
bench: $(INSTALLED)
	mkdir -p $(RESULTS)
	$(BIN)/python bench/core.py --json $(RESULTS)/core.json
	@# Run as root, it also measures shmem_enabled at advise, and puts the setting back.
	$(BIN)/python bench/hugepages.py --json $(RESULTS)/hugepages.json
	$(BIN)/python bench/channel.py --json $(RESULTS)/channel.json
	@# iceoryx2 is optional: without it bench/streams.py notes so and skips its rows.
	$(PIP) -e '.[bench-iceoryx]' \
		|| echo "note: iceoryx2 could not be installed; bench/streams.py skips its rows"
	$(BIN)/python bench/streams.py --json $(RESULTS)/streams.json
	@# Ray is optional too: without it bench/objects.py and bench/broker.py leave out its rows.
	$(PIP) -e '.[bench-ray]' \
		|| echo "note: ray could not be installed; the objects and broker benchmarks skip its rows"
	$(BIN)/python bench/objects.py --json $(RESULTS)/objects.json
	$(BIN)/python bench/broker.py --json $(RESULTS)/broker.json
	@# On the temporary folder's disk; --dir DIR measures another.
	$(BIN)/python bench/spill.py --json $(RESULTS)/spill.json
	$(BIN)/python bench/executors.py --json $(RESULTS)/executors.json
	@# Two brokers on loopback; docs/guide/federation.md's table is copied from it by hand.
	$(BIN)/python bench/federation.py --json $(RESULTS)/federation.json
	$(BIN)/python bench/report.py $(RESULTS) \
		--write docs/performance.md README.md docs/guide/spilling.md

clean:
	rm -rf $(VENV) site .mypy_cache .pytest_cache .ruff_cache .hypothesis
