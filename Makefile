# One-command set-up on a fresh machine: `make demo` (main job) and `make test` (tests).
# Each target creates the virtual environment and installs everything it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch by default; on a GPU node pass e.g. TORCH_SPEC="torch==2.13.0" with your index.
TORCH_SPEC ?= torch==2.13.0
# The known-good set (every dependency but torch, pinned; `make lock` writes it). CONSTRAINTS= installs the
# newest releases instead.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.prefprune-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh) setup.py pyproject.toml $(CONSTRAINTS)

.PHONY: install test test-newest lock lint demo train bench gpu-check gpu-check-dry-run nvcc-check cuda-wheel \
	clean

$(STAMP): $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade $(PIP_C) pip setuptools wheel ninja
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(PIP_C) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The same tests against whatever was released most recently (own venv; run at the start of a session).
test-newest:
	$(MAKE) test VENV=.venv-newest CONSTRAINTS=

# Rewrites constraints.txt from a fresh venv with the newest releases. Triton is held at the version the
# CUDA build of torch requires (a CPU torch requires none), so the one lock serves CPU and GPU nodes.
LOCK_TRITON ?= triton==3.7.1
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip setuptools wheel ninja "$(TORCH_SPEC)" "$(LOCK_TRITON)"
	PREFPRUNE_SKIP_EXT=1 .venv-lock/bin/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	{ echo "# Known-good dependency set of prefprune (every package but torch, which TORCH_SPEC picks)."; \
	  echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python -V); installed by"; \
	  echo "# \`make test\`/\`make demo\`, or: pip install -c constraints.txt -e '.[dev]' --no-build-isolation"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(pip|torch)=='; } > constraints.txt
	rm -rf .venv-lock

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

# A wheel with the CUDA CG kernels, built on this host whether or not it has a GPU: a CUDA build of torch
# in its own venv (installs and imports without a GPU) and nvcc. Installed into a fresh venv, imported, and
# its sm_90 code listed with cuobjdump. `--isolated`: ignore pip settings that point at a local CPU torch.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.13.0
CUDA_ARCHS ?= 8.0;9.0+PTX
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
cuda-wheel: export CUDA_HOME := $(CUDA_HOME)
cuda-wheel: export PATH := $(if $(CUDA_HOME),$(CUDA_HOME)/bin:)$(PATH)
cuda-wheel:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --isolated --quiet --upgrade pip setuptools wheel ninja "$(CUDA_TORCH_SPEC)"
	PREFPRUNE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$${MAX_JOBS:-2} \
	  $(CUDA_VENV)/bin/python -m pip wheel --isolated --no-build-isolation --no-deps -w dist/cuda .
	$(CUDA_VENV)/bin/python bench/check_cuda_wheel.py dist/cuda

clean:
	rm -rf build dist *.egg-info prefprune/_C*.so
