# attnserve: `make run` trains (if needed) and reports the default model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR ?= models/default
TRAIN_MINUTES ?= 5

.PHONY: install run train test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

$(MODEL_DIR)/checkpoint.pt: | $(STAMP)
	$(BIN)/attnserve train --out $(MODEL_DIR) --minutes $(TRAIN_MINUTES)

train: $(MODEL_DIR)/checkpoint.pt

run: $(MODEL_DIR)/checkpoint.pt
	@$(BIN)/python -c "import json; m = json.load(open('$(MODEL_DIR)/metrics.json')); \
	print(f\"model: $(MODEL_DIR) ({m['parameters']:,} parameters, {m['steps']} steps, {m['train_seconds']:.0f}s)\"); \
	print(f\"validation: {m['val_bits_per_byte']:.4f} bits per byte\"); print('sample:', m['sample'])"

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model service export

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
