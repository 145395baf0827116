# tnt-lightning: `make` lists the targets.
PYTHON ?= python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lock check-data test test-anchors test-default-run test-resume test-full lint clean clean-all bench sweep slurm slurm-dry \
	slurm-submit slurm-status test-slurm demo study study-field study-meanpool report gpu-check gpu-check-smoke test-wheel \
	conformance docs docs-serve

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

# LOCK= (empty) installs the newest releases pyproject allows instead of the tested ones.
LOCK ?= requirements.txt
install: ## Install this package (editable) and its declared dependencies, at the tested versions (requirements.txt)
	$(PYTHON) -m pip install $(if $(LOCK),-c $(LOCK)) -e ".[dev]"

# `make lock`: the newest releases pyproject allows, into a fresh venv; the lock is rewritten only
# if the fast suite passes there.
LOCK_VENV ?= /tmp/tnt-lightning-lock-venv
lock: ## Refresh requirements.txt: fresh venv, newest allowed releases, fast tests, then pin them
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -e ".[dev,docs]"
	$(MAKE) test PYTHON=$(LOCK_VENV)/bin/python
	{ echo "# The set the fast suite last passed with (\`make lock\`, $$(date -u +%F), $$(uname -m), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# Used as constraints by \`make install\`: entries a platform does not need are ignored."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^tnt-lightning'; } > requirements.txt.new
	mv requirements.txt.new requirements.txt

# The documentation site (mkdocs.yml, docs/). The docs extra is not part of `make install`: it is
# installed here, at the lock's versions, the first time it is missing.
docs: ## Build the documentation site in strict mode into build/site (a broken link or missing page fails)
	@$(PYTHON) -c 'import mkdocs, material, mkdocstrings' 2>/dev/null || $(PYTHON) -m pip install $(if $(LOCK),-c $(LOCK)) -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict

docs-serve: ## Serve the documentation site at http://127.0.0.1:8000, rebuilt on every change
	@$(PYTHON) -c 'import mkdocs, material, mkdocstrings' 2>/dev/null || $(PYTHON) -m pip install $(if $(LOCK),-c $(LOCK)) -e ".[docs]"
	$(PYTHON) -m mkdocs serve

check-data: ## Decode every image of a folder dataset and list the bad ones (DATA=/path/to/dataset)
	@test -n "$(DATA)" || { echo "DATA=/path/to/dataset is required"; exit 2; }
	$(PYTHON) -m tnt_lightning.data.check $(DATA)

# TEST_WORKERS processes (pytest-xdist), one thread each: several torch processes at 2 threads
# each on 2 cores are far slower than their number.
TEST_WORKERS ?= 2
test: ## Fast tests (slow ones excluded; under 10 minutes on 2 CPU cores, TEST_WORKERS=2)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-anchors: ## The rest of the paper's GFLOPs anchors (make test checks one row per table, method and backbone; ~2 min)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -n $(TEST_WORKERS) -m every_anchor tests/methods/test_anchors.py $(PYTEST_ARGS)

test-default-run: ## The README's `python run.py` exactly (vit_mnist pretrained 20 epochs, top-1 >= 80 %; ~4 min)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -m slow tests/test_run.py $(PYTEST_ARGS)

test-resume: ## The SIGKILL-and-resume tests of training and pretraining (slow: real runs killed mid-way)
	$(PYTHON) -m pytest -m slow tests/tasks/test_resume.py $(PYTEST_ARGS)

test-full: ## All tests, slow ones included (not the real-SLURM one: make test-slurm)
	$(PYTHON) -m pytest -m "not slurm" $(PYTEST_ARGS)

conformance: ## The conformance kit: every registered method x every check, as a Markdown table (~2 min)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m tnt_lightning.testing

# The package as a user gets it (`pip install`), not as the clone runs it: the wheel is built from a
# copy of the sources (no stale build/ in the clone), installed with the lock's versions into a fresh
# venv in a temp folder, and run from a folder outside the clone, TNT_ROOT unset: a cost-only
# evaluation, `bench --help`, the report and `results doctor` on the record it wrote. The checks:
# the configs come from the installed package, Hydra finds its SLURM launcher, the record is ok and
# names no git commit (the temp folder is a git repository, as a user's project holding its venv
# may be: not this package's).
test-wheel: ## Build the wheel, install it in a fresh venv outside the clone, run an eval, bench --help and the report there
	@set -e; tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/tnt-wheel.XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir "$$tmp/src" "$$tmp/run"; \
	git init -q "$$tmp"; git -C "$$tmp" -c user.name=ci -c user.email=ci@localhost commit -q --allow-empty -m venv; \
	tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml README.md conf sweeps src | tar -x -C "$$tmp/src"; \
	echo "test-wheel: building the wheel"; \
	$(PYTHON) -m pip wheel --quiet --no-deps -w "$$tmp/dist" "$$tmp/src"; \
	echo "test-wheel: installing $$(cd "$$tmp/dist" && ls *.whl) in a fresh venv ($$tmp/venv)"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet -c "$(CURDIR)/requirements.txt" "$$tmp"/dist/*.whl; \
	cd "$$tmp/run"; unset TNT_ROOT; export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	conf=$$("$$tmp/venv/bin/python" -c 'from tnt_lightning.config import config_dir; print(config_dir())'); \
	case "$$conf" in "$$tmp/venv/"*) ;; *) echo "test-wheel: configs read from $$conf, not from the wheel"; exit 1;; esac; \
	"$$tmp/venv/bin/tnt-lightning" --info plugins | grep TntSlurmLauncher >/dev/null \
		|| { echo "test-wheel: Hydra finds no TntSlurmLauncher in the wheel (hydra_plugins)"; exit 1; }; \
	"$$tmp/venv/bin/tnt-lightning" method=topk model=vit_mnist data=synthetic measure=quick logger=csv; \
	"$$tmp/venv/bin/python" -m tnt_lightning.measure.bench --help >/dev/null; \
	"$$tmp/venv/bin/python" -m tnt_lightning.report; \
	"$$tmp/venv/bin/python" -m tnt_lightning.results doctor; \
	"$$tmp/venv/bin/python" -c 'import json; [r] = map(json.loads, open("results/results.jsonl")); \
		assert r["status"] == "ok" and r["env"]["git_commit"] is None, (r["status"], r["env"]["git_commit"])'; \
	test -d outputs/runs && test -s reports/results.md; \
	echo "test-wheel: ok (the installed wheel ran an evaluation, bench --help and the report outside the clone)"

lint: ## ruff
	$(PYTHON) -m ruff check src tests scripts examples run.py
	$(PYTHON) -m ruff format --check src tests scripts examples run.py

clean: ## Remove run folders and Python caches (keeps results/ and cache/)
	rm -rf outputs multirun .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-all: clean ## Also remove results/, cache/ (trained backbones and heads) and wandb/
	rm -rf results cache wandb reports

BENCH_ARGS ?=
# The batch-size sweep (docs/speed.md): batch 1, 8, 32, 128 on a CPU (DeiT-T, five methods), up to 256
# on a GPU (DeiT-S, every method), each method beside the plain model and Random drop on its token
# counts, and the latency-vs-tokens table. BENCH_ARGS="--batch-sizes 1,8,32", "--quick" (seconds),
# "--model deit_small"; `python -m tnt_lightning.measure.bench` without --sweep: batch 32 only.
bench: ## Speedup across batch sizes vs the unpruned model and its two ceilings, latency vs tokens; reports/bench (BENCH_ARGS="--quick")
	$(PYTHON) -m tnt_lightning.measure.bench --sweep $(BENCH_ARGS)

# The GPU check (docs/measuring.md#gpu-check): every CUDA path once, in reports/gpu/gpu_check.{md,json};
# exit status 1 if any row failed. The smoke run is the same script on the CPU, small (CI runs it).
GPU_CHECK_ARGS ?=
gpu-check: ## Every CUDA path on one GPU (<= 8 min): gpu tests, methods, throughput, AMP training, memory (GPU_CHECK_ARGS=)
	$(PYTHON) -m tnt_lightning.tasks.gpu_check --device cuda --out reports/gpu $(GPU_CHECK_ARGS)

gpu-check-smoke: ## The GPU check's script on the CPU, small: known to work before a GPU minute is spent (CI)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m tnt_lightning.tasks.gpu_check --device cpu --smoke --out reports/gpu/smoke $(GPU_CHECK_ARGS)

# Sweeps (sweeps/<name>.yaml; `ls sweeps`). ARGS adds overrides: ARGS="model=deit_base_distilled".
# SWEEP may be empty for slurm/slurm-dry: then ARGS alone say what runs.
SWEEP ?=
ARGS ?=
SWEEP_ARG = $(if $(SWEEP),+sweep=$(SWEEP))
# SLURM (hydra/launcher=slurm). GPUS per node: 0 = a CPU job (trainer=cpu, no gres, one task),
# 1 = trainer=gpu, N > 1 = Lightning DDP with one task per GPU (trainer=ddp trainer.devices=N).
# CPUS and MEM_GB are per node (split over the tasks); they must fit the partition's nodes.
# PARTITION/ACCOUNT default to $$SLURM_PARTITION/$$SLURM_ACCOUNT.
PARTITION ?= $(SLURM_PARTITION)
ACCOUNT ?= $(SLURM_ACCOUNT)
GPUS ?= 1
CPUS ?= 8
MEM_GB ?= 64
TIME_MIN ?= 240
PARALLEL ?= 32
SLURM_LOG_DIR ?= $(or $(TNT_ROOT),.)/outputs/slurm
SLURM_TASKS = $(if $(filter 0,$(GPUS)),1,$(GPUS))
SLURM_TRAINER = $(if $(filter 0,$(GPUS)),trainer=cpu,$(if $(filter 1,$(GPUS)),trainer=gpu,trainer=ddp trainer.devices=$(GPUS)))
SLURM_ARGS = $(if $(PARTITION),hydra.launcher.partition=$(PARTITION)) $(if $(ACCOUNT),hydra.launcher.account=$(ACCOUNT)) \
	hydra.launcher.gpus_per_node=$(GPUS) hydra.launcher.tasks_per_node=$(SLURM_TASKS) \
	hydra.launcher.cpus_per_task=$$(( $(CPUS) / $(SLURM_TASKS) )) hydra.launcher.mem_gb=$(MEM_GB) \
	hydra.launcher.timeout_min=$(TIME_MIN) hydra.launcher.array_parallelism=$(PARALLEL) $(SLURM_TRAINER)
# What make can see is wrong before Python starts; the launcher checks the rest (0 CPUs per task...).
SLURM_CHECK = @echo "$(GPUS)" | grep -Eqx '[0-9]+' || { echo "GPUS='$(GPUS)': must be a whole number of GPUs per node (0: a CPU job)"; exit 2; }; \
	for v in CPUS=$(CPUS) MEM_GB=$(MEM_GB) TIME_MIN=$(TIME_MIN) PARALLEL=$(PARALLEL); do \
	echo "$${v\#*=}" | grep -Eqx '[1-9][0-9]*' || { echo "$$v: must be a positive whole number"; exit 2; }; done; \
	test $(CPUS) -ge $(SLURM_TASKS) || { echo "CPUS=$(CPUS) is fewer than the $(SLURM_TASKS) tasks of GPUS=$(GPUS): at least one CPU per task"; exit 2; }
SLURM_RUN = $(PYTHON) run.py -m $(SWEEP_ARG) hydra/launcher=slurm $(SLURM_ARGS) $(ARGS)

sweep: ## Run a sweep here, resumably (SWEEP=mnist_all ARGS="...")
	@test -n "$(SWEEP)" || { echo "SWEEP=<name> is required; one of: $$(ls sweeps | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	$(PYTHON) run.py -m $(SWEEP_ARG) $(ARGS)

slurm: ## Submit a sweep as a SLURM job array and wait for its end (SWEEP= GPUS= CPUS= MEM_GB= TIME_MIN= PARTITION=)
	$(SLURM_CHECK)
	$(SLURM_RUN)

slurm-dry: ## Print the exact sbatch submission of `make slurm` without submitting (same checks)
	$(SLURM_CHECK)
	$(PYTHON) run.py -m $(SWEEP_ARG) hydra/launcher=slurm_dry $(SLURM_ARGS) $(ARGS)

slurm-submit: ## `make slurm` in the background: submit, return at once, log in SLURM_LOG_DIR
	$(SLURM_CHECK)
	@mkdir -p $(SLURM_LOG_DIR); log=$(SLURM_LOG_DIR)/submit-$$(date +%Y%m%d-%H%M%S).log; \
	nohup setsid $(SLURM_RUN) >$$log 2>&1 </dev/null & \
	echo "submitting in the background (pid $$!); log: $$log"; \
	echo "progress: make slurm-status (or: tail -f $$log)"

WATCH_ARGS ?=
slurm-status: ## Progress of the latest SLURM sweep: records by status, jobs by SLURM state (WATCH_ARGS="--follow 30")
	$(PYTHON) -m tnt_lightning.results.watch $(WATCH_ARGS)

# A real single-node SLURM on this machine (root, Debian: installs slurm-wlm, munge, MariaDB),
# then tests/results/test_slurm_real.py against it; scripts/slurm_local.sh stop ends the daemons it started.
SLURM_KEEP ?=
test-slurm: ## Test the SLURM path against a real local slurmctld (root; apt; ~9 min; SLURM_KEEP=1 leaves it up)
	@if [ "$$(id -u)" != 0 ]; then echo "test-slurm: skipped: it needs root (it installs and starts SLURM)"; exit 0; fi; \
	bash scripts/slurm_local.sh start || exit 1; \
	$(PYTHON) -m pytest -m slurm tests/results/test_slurm_real.py $(PYTEST_ARGS); rc=$$?; \
	$(if $(SLURM_KEEP),,bash scripts/slurm_local.sh stop;) exit $$rc

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

# The embedded study in the paper's token regime (vit_cmnist on cluttered MNIST, 196 tokens):
# one backbone per seed (two), every method x K = 0.7, 0.5, 0.3, 0.2 single-layer with both seeds,
# ToMe at K = 0.7 and 0.5 (it merges at most half of the tokens in one layer), the multi-layer
# defaults, token maps of Random, Top-K, TNT and DynamicViT at K = 0.3 for both seeds, and the report
# of every cluttered_mnist run in reports/cmnist_study (under TNT_ROOT if set). Every step must succeed.
# A seed's runs share nothing with another seed's (its own backbone and trainings), so the seeds run
# as parallel lanes, each on its share of the cores (docs/design-notes.md#study-time).
STUDY_SEEDS ?= 0 1
STUDY_THREADS ?= $(shell n=$$(( $$(nproc) / $(words $(STUDY_SEEDS)) )); echo $$(( n > 0 ? n : 1 )))
# Lightning's sanity check would validate on all 1000 held-out canvases (two batches) once more
# before each of a lane's short trainings; the trainer settings are not part of any experiment key.
STUDY_RUN = OMP_NUM_THREADS=$(STUDY_THREADS) $(PYTHON) run.py -m +trainer.num_sanity_val_steps=0
STUDY = model=vit_cmnist data=cluttered_mnist measure=quick sweep_name=cmnist_study skip_recorded=true 'model.pretrain.seed=$${seed}'
STUDY_MAPS = $(STUDY) 'visualize.out_dir=$${paths.root_dir}/reports/token_maps_cmnist'
study: ## The embedded study (paper's 196-token regime, cluttered MNIST), offline: sweep, token maps, report
	$(MAKE) -j$(words $(STUDY_SEEDS)) $(addprefix study-seed-,$(STUDY_SEEDS))
	$(PYTHON) -m tnt_lightning.report --data cluttered_mnist --out $${TNT_ROOT:-.}/reports/cmnist_study $(REPORT_ARGS)

study-seed-%:
	$(STUDY_RUN) $(STUDY) seed=$*
	$(STUDY_RUN) +sweep=cmnist_study seed=$*
	$(STUDY_RUN) $(STUDY) method=tome keep_rate=0.7,0.5 seed=$*
	$(STUDY_RUN) +sweep=cmnist_study_multi seed=$*
	$(STUDY_RUN) task=visualize method=random,topk,tnt,dynamicvit keep_rate=0.3 seed=$* $(STUDY_MAPS)

# The field's training-free methods on the study's backbones, into the same report, outside
# `make study`'s 30 minutes: ATC at every K; DiffRate, MCTF, PPT and PiToMe at K = 0.7 and 0.5 (they
# merge at most half of a block's tokens; DiffRate's released schedules reach no lower K).
study-field: ## The field's training-free methods (ATC, DiffRate, MCTF, PPT, PiToMe) on the study's backbones, into its report
	$(MAKE) -j$(words $(STUDY_SEEDS)) $(addprefix study-field-seed-,$(STUDY_SEEDS))
	$(PYTHON) -m tnt_lightning.report --data cluttered_mnist --out $${TNT_ROOT:-.}/reports/cmnist_study $(REPORT_ARGS)

study-field-seed-%:
	$(STUDY_RUN) $(STUDY) method=atc keep_rate=0.7,0.5,0.3,0.2 seed=$*
	$(STUDY_RUN) $(STUDY) method=diffrate,mctf,ppt,pitome keep_rate=0.7,0.5 seed=$*

# The study's mean-pooled column (vit_cmnist_meanpool, no CLS token, as the paper's ViT/16): its
# backbones (one per seed), TNT, Random, Zero-TP and DynamicViT x K = 0.7, 0.5, 0.3, 0.2 with two
# seeds, and its report in reports/cmnist_study_meanpool (under TNT_ROOT if set).
STUDY_MEANPOOL = model=vit_cmnist_meanpool data=cluttered_mnist measure=quick sweep_name=cmnist_study_meanpool skip_recorded=true 'model.pretrain.seed=$${seed}'
study-meanpool: ## The embedded study's mean-pooled backbone (the paper's ViT/16 column), offline
	$(PYTHON) run.py -m $(STUDY_MEANPOOL) seed=0,1
	$(PYTHON) run.py -m +sweep=cmnist_study_meanpool
	$(PYTHON) -m tnt_lightning.report --model vit_cmnist_meanpool --data cluttered_mnist --out $${TNT_ROOT:-.}/reports/cmnist_study_meanpool $(REPORT_ARGS)
