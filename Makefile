# Two commands on a fresh machine with Python >= 3.10 and pip:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.robalign-installed
EXTRAS := test,weigh,train,bench,deepspeed,docs
# The exact versions the suite last passed under: every install goes through them, so a fresh
# machine gets the tested environment whatever the registry serves that day. Empty: the newest
# versions setup.py's ranges allow (make test-latest). Refresh: make test-latest && make constraints
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(VENV)/constraints.txt,)
# torch==2.13.0 is the CPU build on the CI machines (a newer torch on PyPI is a CUDA build of
# several GB); it is installed only when no torch is importable, so an existing (e.g. CUDA) torch
# is kept, and then the constraints' torch, triton and nvidia-* pins are left out.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-latest test-gpu-versions constraints install clean settings-table docs docs-check

demo: $(STAMP)
	$(PY) -m robalign demo

test: $(STAMP)
	$(PY) -m pytest tests

install: $(STAMP)

# The documentation site (docs/ → site/) with --strict: a broken link, anchor or API name fails it
# (tests/test_docs.py builds it in the suite too)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# The built site opened in headless Chromium (Debian's `chromium`): no console error, every image
# loaded, a screenshot of the index and the API page in site/_check/
docs-check: docs
	$(PY) tests/docs_check.py site

# docs/settings.md from the settings' fields (tests/test_settings.py checks it is current)
settings-table: $(STAMP)
	$(PY) -c "from robalign.app.training.config import settings_markdown; print(settings_markdown(), end='')" > docs/settings.md.tmp
	mv docs/settings.md.tmp docs/settings.md

# The suite in a second environment, .venv-latest, with the newest versions the ranges allow
# (torch held at TORCH_SPEC, the CPU build); not part of .ci/run.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# constraints.txt from an environment whose suite passed (default: the one make test-latest built)
FROM ?= .venv-latest
constraints:
	$(FROM)/bin/python -m pip freeze --all --exclude-editable > constraints.txt.freeze
	{ echo "# The exact versions the suite last passed under ($$(date -u +%F), Python $$($(FROM)/bin/python -c \
	'import platform; print(platform.python_version())'), 2 cores, no GPU)."; \
	  echo "# Written by make constraints from $(FROM); make, .ci/run and README's commands install through it."; \
	  grep -v '^robalign' constraints.txt.freeze | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	rm -f constraints.txt.freeze

# The suite under the lent GPU machine's versions (torch 2.11, Triton 3.6, ...), on CPU: .ci/gpu_versions
test-gpu-versions:
	bash .ci/gpu_versions

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py Makefile $(CONSTRAINTS) $(wildcard csrc/*.cpp) | $(PY)
	$(if $(CONSTRAINTS),if $(PY) -c "import torch" 2>/dev/null; then \
	    grep -vE '^(torch|triton|nvidia-[A-Za-z0-9_.-]+)==' $(CONSTRAINTS) > $(VENV)/constraints.txt; \
	  else cp $(CONSTRAINTS) $(VENV)/constraints.txt; fi)
	$(PY) -m pip install -q $(PIN) --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIN) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIN) --no-build-isolation -e ".[$(EXTRAS)]"
	# DeepSpeed compiles its CPU communication extension on first use: once here, not mid-test
	$(PY) -m robalign.app.training.launch
	touch $(STAMP)

clean:
	rm -rf $(VENV) .venv-latest .venv-gpu-versions build *.egg-info
