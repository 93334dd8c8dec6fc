# make run    installs what is missing, then runs recipes/quickstart.yaml
# make test   installs what is missing, then runs the whole test suite (unit + integration)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgekit-installed

.PHONY: setup browser aarch64 lint run test test-unit clean-runs

setup: $(STAMP)

# Reinstalls only when pyproject.toml or constraints.txt change (the stamp is newer otherwise).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgekit needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a loose torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp (~7 min on 2 cores, once; pip caches the wheel)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -c constraints.txt -e ".[embedded,onnx,lean,ptq,serve,dev]"
	$(PY) -m pip check
	# llama.cpp's convert_hf_to_gguf.py (from the pinned llama-cpp-python sdist): every GGUF export uses it
	$(PY) -c "from edgekit.export.converter import converter_dir; print('llama.cpp converter:', converter_dir())"
	touch $(STAMP)

# A real headless browser for the report test: Debian's chromium-headless-shell, installed when
# missing and this is root on a Debian-like system; otherwise that one test skips, saying why.
browser:
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium-headless-shell >/dev/null; } || echo "note: no Chromium installed; the report browser test will skip"

# llama.cpp cross-built for aarch64 (Raspberry Pi 5's armv8.2-a+dotprod), ONNX Runtime's aarch64 wheel in
# Debian's arm64 Python, and Debian's qemu-user, for the emulated ARM-kernel tests: set up once into
# ~/.cache/edgekit (~6 min + ~1 min) when root + apt, else those tests skip.
aarch64: setup
	@bash third_party/build_llama_aarch64.sh armv8.2-a+dotprod 2>$(VENV)/aarch64-build.log >/dev/null || \
	  echo "note: llama.cpp for aarch64 not built (see $(VENV)/aarch64-build.log); the emulation test will skip"
	@bash third_party/build_ort_aarch64.sh 2>$(VENV)/ort-aarch64-build.log >/dev/null || \
	  echo "note: ONNX Runtime for aarch64 not set up (see $(VENV)/ort-aarch64-build.log); the ONNX emulation test will skip"

run: setup
	$(VENV)/bin/edgekit run recipes/quickstart.yaml

# the layers contract first (seconds): an import that runs uphill, or a cycle, fails the build
lint: setup
	$(VENV)/bin/lint-imports

test: setup browser aarch64 lint
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

clean-runs:
	rm -rf runs
