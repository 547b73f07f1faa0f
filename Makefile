# Two entry points for a new user:  `make pipeline`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, so that the package's `torch>=2.1` requirement is already met. On Linux,
# PyPI's torch==2.13.0 is the CUDA build (multi-GB). A CPU-only machine can take the CPU build from
# PyTorch's index: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu. TORCH_INDEX is empty
# by default (plain PyPI, which CI can reach); it applies to the torch install only.
# Another torch: make TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup pipeline exp test smoke gpu-check gpu-carry clean-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Stage commands call `python`: put the venv first on PATH so they get its interpreter.
# JOBS=2 (or more): the stale stages several at a time, each recorded in dvc.lock as it finishes
# (stages/parallel.py; a stage that runs alone gets every lane's threads); JOBS=1 is plain `dvc repro`.
JOBS ?= 1
pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(if $(filter 1,$(JOBS)),$(BIN)/dvc repro,$(BIN)/python -m stages.parallel --jobs $(JOBS))

# `make exp S="tau=0.3 edit.lambda1=2" JOBS=2`: `dvc exp run -S tau=0.3 -S edit.lambda1=2`, its stages
# JOBS at a time, saved as an experiment (`dvc exp save`; NAME=... names it). JOBS=1 is `dvc exp run`.
S ?=
NAME ?=
exp: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(if $(filter 1,$(JOBS)),$(BIN)/dvc exp run,$(BIN)/python -m stages.parallel --jobs $(JOBS) --exp) $(foreach s,$(S),-S $(s)) $(if $(NAME),--name $(NAME),)

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q

# Every stage on the packaged model, small config, in a throwaway copy (benchmarks/README.md); under 10 min on 2 cores.
smoke: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/pipeline.py --config smoke $(SMOKE_ARGS)

# Everything GPU-side measured in one time-boxed command (benchmarks/gpu_check.py; docs/scale.md "The GPU check").
# A GPU machine has no venv and no network: it uses its own python3 and what `make gpu-carry` packed.
# The dry run, `make gpu-check DEVICE=cpu`, writes the same files with tiny shapes (CI runs it).
DEVICE ?= cuda
OUT ?= gpu-check
CARRY := .gpu_carry
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --device $(DEVICE) --out $(OUT) \
		$(if $(wildcard $(CARRY)/tokenizer/config.json),--tokenizer $(CARRY)/tokenizer) $(GPU_CHECK_ARGS)

# Packs what a GPU machine lacks into $(CARRY)/ (ignored by git; name it in the device call's carry).
gpu-carry: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash benchmarks/gpu_carry.sh $(CARRY)

clean-venv:
	rm -rf $(VENV)
