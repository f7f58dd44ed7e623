# Two entry points: `make serve` (the main job) and `make test` (the test suite).
# Each creates or reuses a virtual environment in $(VENV), installs the pinned CPU build of
# torch first (override with TORCH_SPEC=..., extra pip flags with TORCH_PIP_ARGS=...), then
# the project, then does its job.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
RUN_DIR ?= runs/default
CORPUS ?= builtin:shakespeare
PRESET ?= subword
TRAIN_MINUTES ?= 5
BIN := $(VENV)/bin

.PHONY: serve train test lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.serve: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[corpora]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Trains the default model when $(RUN_DIR) holds none yet.
$(RUN_DIR)/manifest.json: | $(VENV)/.serve
	$(BIN)/python -m training --corpus $(CORPUS) --out $(RUN_DIR) --preset $(PRESET) \
		--max-minutes $(TRAIN_MINUTES)

train: $(RUN_DIR)/manifest.json

HOST ?= 127.0.0.1
PORT ?= 8000

serve: train
	$(BIN)/python -m app --model-dir $(RUN_DIR) --host $(HOST) --port $(PORT)

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
