# gpp_ext developer entry points. `make test` on a fresh clone does the whole set-up by itself.
#
#   make demo            set up, then a short compression run (`gpp demo`) with a printed summary
#   make test            venv + torch + deps, build the extension, Python tests, benchmark smoke run, C++ tests
#   make build           (re)build the extension into the venv (editable install)
#   make bench           full kernel benchmarks -> benchmarks/results/kernels.{json,md}
#   make bench-compression  GPP vs baselines vs Torch-Pruning -> benchmarks/results/compression.* (QUICK=1)
#   make cpp-test        CMake build of the same sources + ctest
#   make lint            static checks of the Python code (ruff: unused/undefined names, line length)
#   make cuda-check      build the CUDA kernels with a CUDA build of torch (no GPU needed), install, load, test
#   make clean           remove build products (keeps the venv); `make distclean` removes it too
#
# Variables: TORCH (pip spec, default torch==2.13.0), PYTHON (interpreter that creates the venv),
# VENV (default .venv), MAX_JOBS (parallel compile jobs, default 2), PYTEST_WORKERS (parallel test processes, default
# one per core up to 4); for cuda-check: CUDA_TORCH
# (default torch==2.14.1, a CUDA 13 build), CUDA_VENV (.venv-cuda), CUDA_TOOLKIT (/usr/local/cuda-13.0),
# CUDA_ARCH (one architecture keeps the check short, default 9.0).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MAX_JOBS ?= 2
# pytest-xdist workers: one per core, at most 4 (each imports torch; the suite is mostly single-threaded Python)
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy tqdm matplotlib scipy scikit-learn pytest pytest-benchmark pytest-xdist hypothesis torch-pruning onnx onnxscript onnxruntime expecttest pybind11 ninja cmake "setuptools>=64" wheel
# One stamp per torch spec, so `make test TORCH=...` reinstalls when the spec changes.
STAMP := $(VENV)/.deps-$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH))))
CMAKE_BUILD := build/cmake
CUDA_TORCH ?= torch==2.14.1
CUDA_VENV ?= .venv-cuda
CUDA_TOOLKIT ?= /usr/local/cuda-13.0
CUDA_ARCH ?= 9.0
# The model zoo tests (torchvision, timm) run in this venv: PyPI's torchvision does not load beside the CPU wheel
# of torch 2.13.0, and the CUDA build of 2.14.1 has a matching torchvision.
CUDA_EXTRA ?= torchvision==0.29.1 timm
CUDA_STAMP := $(CUDA_VENV)/.deps-$(subst =,_,$(CUDA_TORCH))
CUDA_PY := $(abspath $(CUDA_VENV))/bin/python

export MAX_JOBS

.PHONY: all venv build test pytest bench-smoke bench bench-compression cpp-test lint cuda-check demo clean distclean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH)"
	$(PIP) install --quiet --disable-pip-version-check $(DEPS)
	rm -f $(VENV)/.deps-*
	touch $@

build: $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation -e .
	$(PY) -c "import gpp_ext, sys; info = gpp_ext.build_info(); print('gpp_ext build_info:', info); sys.exit(0 if info['extension'] else 1)"

pytest: build
	$(PY) -m pytest tests -n $(PYTEST_WORKERS)

# Each benchmark once, small shapes, untimed: proves the harness and its result checks still work.
bench-smoke: build
	GPP_EXT_BENCH=smoke $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

cpp-test: $(STAMP)
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	$(VENV)/bin/ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test: pytest bench-smoke cpp-test

# ruff is a developer's tool, not a dependency of the package: installed into the venv when missing
lint: $(STAMP)
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install --quiet --disable-pip-version-check ruff
	$(PY) -m ruff check gpp_ext benchmarks tests setup.py

$(CUDA_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install --quiet --disable-pip-version-check "$(CUDA_TORCH)"
	$(CUDA_PY) -m pip install --quiet --disable-pip-version-check $(DEPS) $(CUDA_EXTRA)
	rm -f $(CUDA_VENV)/.deps-*
	touch $@

# Compile, link and load the CUDA kernels on a machine without a GPU: a clean copy of the tree is installed
# (not editable) into a venv with a CUDA build of torch, imported from outside the source tree, checked for a
# CUDA kernel behind every op, and run through the test suite (its CUDA cases skip without a GPU). torch's
# own guess of CUDA_HOME follows the nvcc on PATH, which may be a wrapper, so the toolkit is named here; the
# CUDA library headers torch's headers need ship in the venv (nvidia/cu13/include).
cuda-check: $(CUDA_STAMP)
	@test -x $(CUDA_TOOLKIT)/bin/nvcc || { echo "cuda-check: no $(CUDA_TOOLKIT)/bin/nvcc; set CUDA_TOOLKIT"; exit 1; }
	rm -rf build/cuda-src build/cuda-run && mkdir -p build/cuda-src build/cuda-run
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t build/cuda-src
	cd build/cuda-src && CUDA_HOME=$(CUDA_TOOLKIT) GPP_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH)" \
		CPATH="$$($(CUDA_PY) -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')" \
		$(CUDA_PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
	cd build/cuda-run && $(CUDA_PY) -c "import gpp_ext, sys; info = gpp_ext.build_info(); print('gpp_ext (CUDA build) build_info:', info); sys.exit(0 if info['extension'] and info['cuda'] else 1)"
	cd build/cuda-run && GPP_EXT_EXPECT_CUDA=1 $(CUDA_PY) -m pytest $(CURDIR)/tests -q -p no:cacheprovider --rootdir=$(CURDIR) -n $(PYTEST_WORKERS)

# A short grow-push-prune run with a printed summary (Fashion-MNIST when installed, else digits).
demo: build
	$(VENV)/bin/gpp demo

bench: build
	$(PY) benchmarks/run_kernels.py

# GPP against our baselines and Torch-Pruning (an optional dependency, installed here). QUICK=1 for a few minutes.
bench-compression: build
	$(PIP) install --quiet --disable-pip-version-check torch-pruning
	$(PY) -m benchmarks.compression $(if $(QUICK),--quick,)

clean:
	rm -rf build *.egg-info gpp_ext/_C*.so .pytest_cache .benchmarks
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
