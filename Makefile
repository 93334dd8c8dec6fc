# make run    installs what is missing, then runs recipes/quickstart.yaml
# make test   installs what is missing, then runs the whole test suite (unit + integration)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgekit-installed

.PHONY: setup run test test-unit clean-runs

setup: $(STAMP)

# Reinstalls only when pyproject.toml or constraints.txt change (the stamp is newer otherwise).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgekit needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a loose torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp (~7 min on 2 cores, once; pip caches the wheel)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -c constraints.txt -e ".[embedded,onnx,lean,ptq,dev]"
	$(PY) -m pip check
	touch $(STAMP)

run: setup
	$(VENV)/bin/edgekit run recipes/quickstart.yaml

test: setup
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

clean-runs:
	rm -rf runs
