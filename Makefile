# The two set-up-and-go commands: `make run` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,slurm
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench headline lint install clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: tiny Qwen3 trained here on math_synth and code_synth,
# references (base, early SFT, converged SFT) evaluated with lm-eval, ARM and every baseline merged
# from the same early checkpoints with their config defaults (conf/merge/*.yaml), then the table.
RUN_DIR := outputs/runs/make-run
RUN_METHODS ?= none,arm,linear,task_arithmetic,ties,expo,dare

run: $(STAMP)
	rm -rf $(RUN_DIR)
	$(BIN)/arm -m domain=math_synth,code_synth merge=$(RUN_METHODS) hydra.sweep.dir=$(RUN_DIR)
	$(BIN)/arm-table $(RUN_DIR) --out $(RUN_DIR)/table.md
	@echo
	@cat $(RUN_DIR)/table.md
	@echo
	@echo "results.json per model:  $(RUN_DIR)/*/results/*/results.json"
	@echo "plots (loss, score/step): $(RUN_DIR)/*/trajectory.png"
	@echo "W&B runs (offline):       $(RUN_DIR)/*/wandb  (upload: .venv/bin/wandb sync <run folder>)"
	@echo "trajectories and cache:   outputs/cache"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check arm baselines evals tests benchmarks

# The headline experiment: every method's hyperparameters chosen on the validation split, ARM
# ablations, then the test-split table (conf/tuning/embedded.yaml; docs/results.md).
HEADLINE_DIR := outputs/runs/headline

headline: $(STAMP)
	$(BIN)/arm-tune --out $(HEADLINE_DIR)

# Merge engine vs mergekit and the I/O floor, then ARM's cost vs the SFT it replaces.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.merge_bench
	$(BIN)/python -m benchmarks.arm_bench

clean-cache:
	rm -rf outputs/cache
