# convstack: every target installs what it needs first (see `setup`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-pyproject
CONVSTACK := $(BIN)/convstack
DEMO_DIR := build/demo
PYTEST_ARGS ?=

.PHONY: setup demo train serve test lint format bench bench-train bench-serve k8s-render clean

# (Re)install only when the venv is missing or pyproject.toml changed.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	cp pyproject.toml $(STAMP)

# The main job: train on the bundled digits with 2 replicas, export version 1, serve it with
# the embedded server and predict through gRPC and REST; then train version 2 and roll it out
# (canary with gates, then stable) on two server replicas that share one models.config.
demo: setup
	rm -rf $(DEMO_DIR)
	$(CONVSTACK) train --data digits --replicas 2 --epochs 25 \
		--model-base $(DEMO_DIR)/models --model-name digits --run-dir $(DEMO_DIR)/runs/digits
	$(BIN)/python -m convstack.demo --model-base $(DEMO_DIR)/models --model-name digits
	$(CONVSTACK) train --data digits --replicas 2 --epochs 30 \
		--model-base $(DEMO_DIR)/models --model-name digits --run-dir $(DEMO_DIR)/runs/digits-v2
	$(BIN)/python -m convstack.rollout_demo --model-base $(DEMO_DIR)/models --model-name digits \
		--config $(DEMO_DIR)/models.config

train: setup
	$(CONVSTACK) train --data digits --replicas 2 --epochs 25 \
		--model-base models --model-name digits --run-dir runs/digits

serve: setup
	$(CONVSTACK) serve --model_base models --model_name digits

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-train bench-serve

bench-train: setup
	$(CONVSTACK) bench train --out bench-results/train.json

# Needs an exported model: run `make demo` first.
bench-serve: setup
	$(CONVSTACK) bench serve --model-base $(DEMO_DIR)/models --model-name digits \
		--out bench-results/serve.json

# Render and validate every Kustomize overlay into build/k8s/OVERLAY.yaml.
k8s-render: setup
	$(BIN)/python -m convstack.k8s_render --all --out-dir build/k8s

clean:
	rm -rf build bench-results
