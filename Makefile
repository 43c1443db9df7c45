# One-command set-up on a fresh machine: `make demo` (main job) and `make test` (tests).
# Each target creates the virtual environment and installs everything it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch by default; on a GPU node pass e.g. TORCH_SPEC="torch==2.13.0" with your index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.prefprune-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh) setup.py pyproject.toml

.PHONY: install test lint demo train bench gpu-check gpu-check-dry-run nvcc-check clean

$(STAMP): $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The inner loop: everything but the tests marked slow (subprocesses, torchrun, kills, AOT compiles, pip).
.PHONY: test-fast
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

train: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/prefprune train --output runs/default-train

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/prefprune demo --output runs/demo

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

# The prepared GPU check (bench/gpu_check.py): on a CUDA machine it installs the tree itself if needed;
# the dry run is its CPU part (CI runs it from a fresh clone, see .ci/run).
gpu-check:
	$(PYTHON) bench/gpu_check.py

gpu-check-dry-run: $(STAMP)
	$(PY) bench/gpu_check.py --dry-run

# Compile every CUDA source for sm_90, warnings as errors (works without a GPU or a CUDA torch:
# the .cu files include no ATen headers).
nvcc-check:
	@if command -v nvcc >/dev/null 2>&1; then \
	  for f in $(wildcard csrc/*.cu); do echo "nvcc -arch=sm_90 -c $$f"; \
	    nvcc -std=c++17 -arch=sm_90 -Werror all-warnings -Xcompiler -Wall,-Wextra \
	      -c $$f -o /tmp/prefprune-$$(basename $$f).o || exit 1; done; \
	else echo "nvcc not found: skipping CUDA compile check"; fi

clean:
	rm -rf build dist *.egg-info prefprune/_C*.so
