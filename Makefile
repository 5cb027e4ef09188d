# vllm-tune developer tasks. Everything runs from the project's own virtual environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench demo clean

$(BIN)/vllm-tune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/vllm-tune

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check vllm_tuner tests scripts
	$(BIN)/ruff format --check vllm_tuner tests scripts

bench: install
	$(BIN)/python scripts/bench.py

demo: install
	$(BIN)/vllm-tune find --model qwen2.5-7b --gpus 2 --simulate rtx-5090

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
