# The two set-up-and-go commands: `make run` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,slurm
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint install clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: tiny Qwen3 trained here on math_synth and code_synth,
# references (base, early SFT, converged SFT) evaluated with lm-eval, then the table.
run: $(STAMP)
	$(BIN)/arm -m domain=math_synth,code_synth hydra.sweep.dir=outputs/runs/make-run
	$(BIN)/arm-table outputs/runs/make-run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check arm baselines evals tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.merge_bench

clean-cache:
	rm -rf outputs/cache
