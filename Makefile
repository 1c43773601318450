# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment on first use and reinstall when pyproject.toml changes.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: setup demo demo-local test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The main job: Sparse Model Soups on the embedded digits data, with the IMP baselines.
demo: setup
	$(BIN)/fedsms local --out-dir runs/demo-$$(date +%Y%m%d-%H%M%S) --seeds 0,1,2

# Every test, the slow end-to-end ones included (what CI runs).
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
