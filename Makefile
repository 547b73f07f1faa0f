# Two entry points for a new user:  `make pipeline`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned first so that the `torch>=2.1` requirement is already met and pip
# never pulls the multi-GB CUDA wheels on a CPU machine. On a GPU machine: make TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup pipeline test clean-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Stage commands call `python`: put the venv first on PATH so they get its interpreter.
pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)
