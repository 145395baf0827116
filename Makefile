# tnt-lightning: `make` lists the targets.
PYTHON ?= python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint clean clean-all bench

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## Install the requirements and this package (editable) into the active Python environment
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

test: ## Fast tests (slow ones excluded; a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-full: ## All tests, slow ones included
	$(PYTHON) -m pytest -m "" $(PYTEST_ARGS)

lint: ## ruff
	$(PYTHON) -m ruff check src tests run.py
	$(PYTHON) -m ruff format --check src tests run.py

clean: ## Remove run folders and Python caches (keeps results/ and cache/)
	rm -rf outputs multirun .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-all: clean ## Also remove results/, cache/ (trained backbones and heads) and wandb/
	rm -rf results cache wandb reports

BENCH_ARGS ?=
bench: ## Speed of every method vs the unpruned DeiT-S, in one process (BENCH_ARGS="--model deit_tiny_distilled")
	$(PYTHON) -m tnt_lightning.bench $(BENCH_ARGS)
