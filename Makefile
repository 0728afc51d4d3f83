# gpp_ext developer entry points. `make test` on a fresh clone does the whole set-up by itself.
#
#   make test            venv + torch + deps, build the extension, Python tests, benchmark smoke run, C++ tests
#   make build           (re)build the extension into the venv (editable install)
#   make bench           full kernel benchmarks -> benchmarks/results/kernels.{json,md}
#   make cpp-test        CMake build of the same sources + ctest
#   make clean           remove build products (keeps the venv); `make distclean` removes it too
#
# Variables: TORCH (pip spec, default torch==2.13.0), PYTHON (interpreter that creates the venv),
# VENV (default .venv), MAX_JOBS (parallel compile jobs, default 2).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy scipy scikit-learn pytest pytest-benchmark expecttest pybind11 ninja cmake "setuptools>=64" wheel
# One stamp per torch spec, so `make test TORCH=...` reinstalls when the spec changes.
STAMP := $(VENV)/.deps-$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH))))
CMAKE_BUILD := build/cmake

export MAX_JOBS

.PHONY: all venv build test pytest bench-smoke bench cpp-test clean distclean

all: test

venv: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH)"
	$(PIP) install --quiet --disable-pip-version-check $(DEPS)
	rm -f $(VENV)/.deps-*
	touch $@

build: $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation -e .
	$(PY) -c "import gpp_ext, sys; info = gpp_ext.build_info(); print('gpp_ext build_info:', info); sys.exit(0 if info['extension'] else 1)"

pytest: build
	GPP_EXT_REQUIRE_EXTENSION=1 $(PY) -m pytest tests

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

bench: build
	$(PY) benchmarks/run_kernels.py

clean:
	rm -rf build *.egg-info gpp_ext/_C*.so .pytest_cache .benchmarks
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
