# Two commands matter on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# `make test-gpu` runs on a CUDA machine's python (.venv's when there is one; no network): wheels that
# `bash ../shared/gpu/wheels.sh` gathered into .whl/ are installed into .whl/site for the packages that
# python cannot import yet (datasets, fairscale, ...).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_SITE := $(CURDIR)/.whl/site

.PHONY: install test test-real-data test-gpu demo lint format bench clean

$(STAMP): pyproject.toml
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "rlhf needs Python >= 3.11: make $(MAKECMDGOALS) PYTHON=python3.11 (after make clean if .venv is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the tests that read the real GSM8K / Anthropic HH files in ../shared/data (skipped where it is absent)
test-real-data: $(STAMP)
	$(BIN)/python -m pytest -q -m real_data tests

test-gpu:
	@export PYTHONPATH="$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}"; \
	missing=""; \
	for wheel in $$(ls .whl/*.whl 2>/dev/null); do \
	  name=$$(basename "$$wheel" | cut -d- -f1); \
	  $(GPU_PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$$name') is None)" \
	    || missing="$$missing $$wheel"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing into .whl/site:$$missing"; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target "$(GPU_SITE)" $$missing || exit 1; \
	fi; \
	$(GPU_PYTHON) -m pytest -q -m gpu tests/test_gpu.py tests/test_generation_gpu.py tests/test_ppo_memory.py

demo: $(STAMP)
	$(BIN)/python -m rlhf.demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
