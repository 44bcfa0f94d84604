# attnserve: `make run` trains (if needed), exports and serves the default model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/default
CHECKPOINT := $(MODEL)/checkpoint
MODEL_DIR := $(MODEL)/onnx
TRAIN_MINUTES ?= 5

.PHONY: install run train export bench protos lock deploy-tools image image-test test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

$(CHECKPOINT)/checkpoint.pt: | $(STAMP)
	$(BIN)/attnserve train --out $(CHECKPOINT) --minutes $(TRAIN_MINUTES)

$(MODEL_DIR)/config.json: $(CHECKPOINT)/checkpoint.pt
	$(BIN)/attnserve export --checkpoint $(CHECKPOINT) --out $(MODEL_DIR) --int8 --fp16

train: $(CHECKPOINT)/checkpoint.pt

export: $(MODEL_DIR)/config.json

PORT ?= 50051
METRICS_PORT ?= 8000

run: $(MODEL_DIR)/config.json
	@$(BIN)/python -c "import json; m = json.load(open('$(CHECKPOINT)/metrics.json')); \
	print(f\"model: $(MODEL) ({m['parameters']:,} parameters, {m['steps']} steps, {m['train_seconds']:.0f}s)\"); \
	print(f\"validation: {m['val_bits_per_byte']:.4f} bits per byte; model directory $(MODEL_DIR)\")"
	@echo "serving on localhost:$(PORT), metrics on http://localhost:$(METRICS_PORT)/metrics; try:"
	@echo "  $(BIN)/attnserve client --address localhost:$(PORT) encode 'To be, or not to be'"
	@echo "  $(BIN)/attnserve client --address localhost:$(PORT) attention 'To be, or not to be' --png maps/"
	$(BIN)/attnserve serve --model-dir $(MODEL_DIR) --port $(PORT) --metrics-port $(METRICS_PORT)

bench: $(MODEL_DIR)/config.json
	$(BIN)/attnserve bench runtime --model-dir $(MODEL_DIR)
	$(BIN)/attnserve bench encode --model-dir $(MODEL_DIR)

# regenerate the committed protobuf code (tests/protos checks it is current)
protos: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/attnserve/v1/attnserve.proto protos/inference/grpc_predict_v2.proto

# rewrite the lock (constraints.txt) from what .venv holds now, keeping its header
lock: install
	{ grep '^#' constraints.txt; { $(BIN)/pip freeze --exclude-editable | grep -v '^attnserve=' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; $(BIN)/pip freeze | sed -n 's/^onnxruntime-gpu==/onnxruntime==/p'; } \
	  | sort -f -t= -k1,1; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# kubectl, promtool and prometheus for tests/deploy, from Debian's packages where this machine may install
# them; where it cannot, those tests say so and skip.
deploy-tools:
	@for tool in kubectl:kubectl promtool:prometheus; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $${tool##*:}) >/dev/null 2>&1 \
	    || echo "$${tool##*:} could not be installed here: the tests that need $${tool%%:*} will be skipped"; }; \
	done

# container images, where a container engine runs (see README, "Deploying")
image: $(MODEL_DIR)/config.json
	@docker info >/dev/null 2>&1 || { echo "make image needs a running container engine (docker)"; exit 1; }
	docker build -f deploy/docker/Dockerfile.cpu --build-arg MODEL_DIR=$(MODEL_DIR) -t attnserve:cpu .
	docker build -f deploy/docker/Dockerfile.cuda --build-arg MODEL_DIR=$(MODEL_DIR) -t attnserve:cuda .

test: install deploy-tools
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model service export bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
