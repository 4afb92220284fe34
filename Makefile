# convstack: every target installs what it needs first (see `setup`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-pyproject
CONVSTACK := $(BIN)/convstack
DEMO_DIR := build/demo
PYTEST_ARGS ?=
# `make train`: the run directory (a new RUN trains and exports a new version) and its epochs.
RUN ?= digits
EPOCHS ?= 25
# `make serve` / `make rollout` / `make predict`: the config the rollouts edit, and the server.
MODELS_CONFIG := models.config
TARGET ?= localhost:8500

.PHONY: setup demo train serve rollout predict test lint format bench bench-train bench-serve \
	bench-infer bench-peer k8s-render protos clean

# (Re)install only when the venv is missing or pyproject.toml changed. setuptools warns on every
# editable install that a folder named like the package may shadow it on imports: our
# convstack/ folder is that package (pyproject's package-dir), so that one warning is off.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[all,dev]'
	cp pyproject.toml $(STAMP)

# The main job (convstack/demo): train version 1 on the bundled digits with 2 replicas, serve it
# with the embedded server and predict through gRPC and REST; train a better version 2 (one
# change, named in the output) and a deliberately weak version 3; on two server replicas that
# share one models.config, roll 2 out through canary to stable and watch the quality gate refuse 3.
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m convstack.demo --dir $(DEMO_DIR)

train: setup
	$(CONVSTACK) train --data digits --replicas 2 --epochs $(EPOCHS) \
		--model-base models --model-name digits --run-dir runs/$(RUN)

# Created once (serving the newest version); from then on the rollout commands edit it.
$(MODELS_CONFIG): | setup
	$(CONVSTACK) models-config add --config $@ --name digits --base-path $(CURDIR)/models/digits \
		--latest 1

serve: setup $(MODELS_CONFIG)
	$(CONVSTACK) serve --model_config_file $(MODELS_CONFIG) \
		--model_config_file_poll_wait_seconds 2 --file_system_poll_wait_seconds 2

# Gates, canary, observe and promote VERSION on the server of `make serve`.
rollout: setup
	@test -n "$(VERSION)" || { echo "usage: make rollout VERSION=N"; exit 2; }
	$(CONVSTACK) rollout run $(VERSION) --model digits --store file:$(MODELS_CONFIG) \
		--servers $(TARGET) --observe-seconds 10
	$(CONVSTACK) rollout status --model digits --store file:$(MODELS_CONFIG) --servers $(TARGET)

predict: setup
	@test -n "$(IMAGES)" || { echo "usage: make predict IMAGES='a.png b.png'"; exit 2; }
	$(CONVSTACK) predict --target $(TARGET) --model digits $(if $(LABEL),--label $(LABEL)) $(IMAGES)

# Two pytest workers (one per core here); a test module stays on one worker, so its module
# servers start once. PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-train bench-serve bench-infer

bench-train: setup
	$(CONVSTACK) bench train --out bench-results/train.json

# Needs an exported model: run `make demo` first.
bench-serve: setup
	$(CONVSTACK) bench serve --control --model-base $(DEMO_DIR)/models --model-name digits \
		--out bench-results/serve.json

# The same against KServe's Python server, side by side (its venv is made once, cached under
# ~/.cache/convstack). Trains its own digits version once (under a minute), with an int8
# model.tflite for the TFLite column: a quantised model, its accuracy beside the SavedModel's in
# the report and the model card.
BENCH_MODELS := build/bench/models
bench-peer: setup
	test -d $(BENCH_MODELS)/digits/1 || $(CONVSTACK) train --data digits --replicas 1 --epochs 10 \
		--tflite int8 --model-base $(BENCH_MODELS) --model-name digits \
		--run-dir build/bench/runs/digits --progress log
	$(CONVSTACK) bench serve --peer kserve --control --model-base $(BENCH_MODELS) --model-name digits \
		--out bench-results/serve-peer.json

# Every in-process inference path of one version (SavedModel, XLA, TFLite, Keras); trains its
# own digits version with an int8 model.tflite once (about 2 minutes in all).
bench-infer: setup
	test -d build/bench-infer/models/digits/1 || $(CONVSTACK) train --data digits --epochs 10 \
		--tflite int8 --model-base build/bench-infer/models --model-name digits \
		--run-dir build/bench-infer/runs/digits --progress log
	$(CONVSTACK) bench infer --model-base build/bench-infer/models --model-name digits \
		--out bench-results/infer.json

# Render and validate every Kustomize overlay into build/k8s/OVERLAY.yaml.
k8s-render: setup
	$(BIN)/python -m convstack.k8s.render --all --out-dir build/k8s

# The client's wire messages: client/wire/*.proto -> the committed client/wire/*_pb2.py. protoc
# names each file by its import path, convstack/client/wire/X.proto, hence the staging folder.
PROTO_STAGE := build/protos
protos: setup
	rm -rf $(PROTO_STAGE) && mkdir -p $(PROTO_STAGE)/convstack/client/wire
	cp client/wire/*.proto $(PROTO_STAGE)/convstack/client/wire/
	cd $(PROTO_STAGE) && $(CURDIR)/$(BIN)/python -m grpc_tools.protoc -I . --python_out=. \
		convstack/client/wire/*.proto
	cp $(PROTO_STAGE)/convstack/client/wire/*_pb2.py client/wire/

clean:
	rm -rf build bench-results
