# phi-toolkit developer commands. `make test` and `make demo` work on a fresh machine: they create .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: small, and what CI uses. Override with `make TORCH_SPEC=torch ...` for another build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= def fibonacci(n):

.PHONY: install test lint demo tiny-model bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check phi_core phi_cli tests scripts benchmarks
	$(VENV)/bin/ruff format --check phi_core phi_cli tests scripts benchmarks

demo: $(VENV)/.installed
	$(VENV)/bin/phi generate "$(PROMPT)" --max-new-tokens 60

# Retrains the embedded models (about 1.5 hours on 2 CPU cores); see docs/tiny-model.md.
tiny-model: $(VENV)/.installed
	$(PY) scripts/train_tiny.py lm
	$(PY) scripts/train_tiny.py heads

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
