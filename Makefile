# ussycode: `make serve` runs the server, `make test` runs every check. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= /var/lib/ussycode
IMAGE ?= ussyuntu
SERVE_ARGS ?=

.PHONY: deps serve image test lint bench clean

deps:
	@scripts/install-deps.sh

image: deps
	@$(BIN)/ussycode image build --name $(IMAGE) --if-missing --data-dir $(DATA_DIR)

serve: image
	$(BIN)/ussycode serve --data-dir $(DATA_DIR) $(SERVE_ARGS)

test: deps
	@scripts/test.sh

lint: deps
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/results
