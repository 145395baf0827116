# tnt-lightning: `make` lists the targets.
PYTHON ?= python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lock check-data test test-full lint clean clean-all bench sweep slurm slurm-dry demo report

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

# LOCK= (empty) installs the newest releases pyproject allows instead of the tested ones.
LOCK ?= requirements-lock.txt
install: ## Install this package (editable) and its declared dependencies, at the tested versions (requirements-lock.txt)
	$(PYTHON) -m pip install $(if $(LOCK),-c $(LOCK)) -e ".[dev]"

# `make lock`: the newest releases pyproject allows, into a fresh venv; the lock is rewritten only
# if the fast suite passes there.
LOCK_VENV ?= /tmp/tnt-lightning-lock-venv
lock: ## Refresh requirements-lock.txt: fresh venv, newest allowed releases, fast tests, then pin them
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -e ".[dev]"
	$(MAKE) test PYTHON=$(LOCK_VENV)/bin/python
	{ echo "# The set the fast suite last passed with (\`make lock\`, $$(date -u +%F), $$(uname -m), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# Used as constraints by \`make install\`: entries a platform does not need are ignored."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^tnt-lightning'; } > requirements-lock.txt.new
	mv requirements-lock.txt.new requirements-lock.txt

check-data: ## Decode every image of a folder dataset and list the bad ones (DATA=/path/to/dataset)
	@test -n "$(DATA)" || { echo "DATA=/path/to/dataset is required"; exit 2; }
	$(PYTHON) -m tnt_lightning.data.check $(DATA)

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

# Sweeps (sweeps/<name>.yaml; `ls sweeps`). ARGS adds overrides: ARGS="model=deit_base_distilled".
# SWEEP may be empty for slurm/slurm-dry: then ARGS alone say what runs.
SWEEP ?=
ARGS ?=
SWEEP_ARG = $(if $(SWEEP),+sweep=$(SWEEP))
# SLURM resources (hydra/launcher=slurm); GPUS > 1 trains with Lightning DDP, one task per GPU.
PARTITION ?=
ACCOUNT ?=
GPUS ?= 1
CPUS ?= 8
MEM_GB ?= 64
TIME_MIN ?= 240
PARALLEL ?= 32
SLURM_ARGS = hydra.launcher.partition=$(or $(PARTITION),null) hydra.launcher.account=$(or $(ACCOUNT),null) \
	hydra.launcher.gpus_per_node=$(GPUS) hydra.launcher.cpus_per_task=$(CPUS) hydra.launcher.mem_gb=$(MEM_GB) \
	hydra.launcher.timeout_min=$(TIME_MIN) hydra.launcher.array_parallelism=$(PARALLEL) \
	$(if $(filter 1,$(GPUS)),trainer=gpu,trainer=ddp trainer.devices=$(GPUS))

sweep: ## Run a sweep here, resumably (SWEEP=mnist_all ARGS="...")
	@test -n "$(SWEEP)" || { echo "SWEEP=<name> is required; one of: $$(ls sweeps | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	$(PYTHON) run.py -m $(SWEEP_ARG) $(ARGS)

slurm: ## Submit a sweep as a SLURM job array (SWEEP= PARTITION= GPUS= CPUS= MEM_GB= TIME_MIN= PARALLEL=)
	$(PYTHON) run.py -m $(SWEEP_ARG) hydra/launcher=slurm $(SLURM_ARGS) $(ARGS)

slurm-dry: ## Print the exact sbatch submission of `make slurm` without submitting
	$(PYTHON) run.py -m $(SWEEP_ARG) hydra/launcher=slurm_dry $(SLURM_ARGS) $(ARGS)

REPORT_ARGS ?=
report: ## Tables and plots of results/results.jsonl beside the paper's numbers, in reports/ (REPORT_ARGS="--sweep NAME --wandb")
	$(PYTHON) -m tnt_lightning.report $(REPORT_ARGS)

# Every step must succeed. Single-layer ToMe at K <= 0.5 fails by design on 49 patches, so the
# mnist_all grid leaves ToMe out and it runs at K = 0.7 alone, in the same sweep.
DEMO_MAPS = sweep_name=mnist_all skip_recorded=true 'visualize.out_dir=$${paths.root_dir}/reports/token_maps'
demo: ## The embedded default end to end, offline: baseline, all-methods sweep, token maps, report
	$(PYTHON) run.py sweep_name=mnist_all skip_recorded=true
	$(PYTHON) run.py -m +sweep=mnist_all
	$(PYTHON) run.py method=tome keep_rate=0.7 sweep_name=mnist_all skip_recorded=true
	$(PYTHON) run.py -m task=visualize method=topk,etps,tnt,dynamicvit keep_rate=0.3 $(DEMO_MAPS)
	$(PYTHON) run.py task=visualize method=tome keep_rate=0.7 $(DEMO_MAPS)
	$(PYTHON) -m tnt_lightning.report --sweep mnist_all $(REPORT_ARGS)
