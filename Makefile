# `make demo` and `make test` are all a newcomer needs: both create .venv and
# install the project into it on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(INSTALLED)

# The channel demo, then frames through a pool to subscribers, then the broker.
demo: $(INSTALLED)
	$(BIN)/blobplane demo
	$(BIN)/blobplane demo --stream --seconds 5
	$(BIN)/blobplane demo-broker

lint: $(INSTALLED)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(INSTALLED)
	$(BIN)/mypy

unit: $(INSTALLED)
	$(BIN)/pytest

test: lint typecheck unit

bench: $(INSTALLED)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/channel.py
	@# iceoryx2 is optional: without it bench/streams.py notes so and skips its rows.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench-iceoryx]' \
		|| echo "note: iceoryx2 could not be installed; bench/streams.py skips its rows"
	$(BIN)/python bench/streams.py
	@# Ray is optional too: without it bench/objects.py and bench/broker.py leave out its rows.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench-ray]' \
		|| echo "note: ray could not be installed; the objects and broker benchmarks skip its rows"
	$(BIN)/python bench/objects.py
	$(BIN)/python bench/broker.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
