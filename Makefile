# Two commands on a fresh machine with Python >= 3.10 and pip:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.robalign-installed
# torch==2.13.0 is the CPU build on the CI machines; it is installed only when no torch is
# importable, so an existing (e.g. CUDA) torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-gpu-versions install clean

demo: $(STAMP)
	$(PY) -m robalign demo

test: $(STAMP)
	$(PY) -m pytest tests

install: $(STAMP)

# The suite under the lent GPU machine's versions (torch 2.11, Triton 3.6, ...), on CPU: .ci/gpu_versions
test-gpu-versions:
	bash .ci/gpu_versions

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py Makefile $(wildcard csrc/*.cpp) | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,weigh,train,bench,deepspeed]"
	# DeepSpeed compiles its CPU communication extension on first use: once here, not mid-test
	$(PY) -m robalign.app.launch
	touch $(STAMP)

clean:
	rm -rf $(VENV) .venv-gpu-versions build *.egg-info
