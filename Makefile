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

# podman and what it needs to build and run the images here (see deploy/podman/)
PODMAN_PACKAGES := podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs containernetworking-plugins
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf

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
	@command -v podman >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(PODMAN_PACKAGES)) >/dev/null 2>&1 \
	    || echo "podman could not be installed here: the container tests will be skipped"; }

image: $(MODEL_DIR)/config.json
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker; \
	elif command -v podman >/dev/null 2>&1; then engine="podman"; fmt="--format docker"; \
	else echo "make image needs a container engine (docker or podman)"; exit 1; fi; \
	for v in cpu cuda; do $$engine build $$fmt -f deploy/docker/Dockerfile.$$v --build-arg MODEL_DIR=$(MODEL_DIR) \
	  -t attnserve:$$v . || exit 1; done

# build the CPU image with podman and run it as an operator would (tests/deploy/test_container.py)
image-test: install deploy-tools
	$(BIN)/python -m pytest -m container -s -ra tests/deploy/test_container.py

test: install deploy-tools
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model service export bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
