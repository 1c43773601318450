# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment on first use and reinstall when pyproject.toml changes.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: setup demo demo-local test test-fast lint bench-systems bench-quality clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,fast,datasets]'
	touch $@

# The main job: the local IMP, IMP best-of-m and SMS baselines on the embedded digits data,
# then a federated hyperparameter soup (4 virtual Flower clients, 3 phases) from the same
# dense model, printed side by side. runs/demo-latest points to the newest demo's folder.
demo: setup
	out=demo-$$(date +%Y%m%d-%H%M%S) && \
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/fedsms simulate --num-clients 4 --phases 3 \
	    --min-train-clients 4 --min-available-clients 4 --baselines imp,imp-best,sms --out-dir runs/$$out && \
	ln -sfn $$out runs/demo-latest

# Sparse Model Soups and every baseline on one machine, 3 seeds (mean ± std).
demo-local: setup
	$(BIN)/fedsms local --out-dir runs/demo-local-$$(date +%Y%m%d-%H%M%S) --seeds 0,1,2

# Every test, the slow end-to-end ones included (what CI runs).
test: setup
	$(BIN)/python -m pytest -q

# The unit tier: everything but the end-to-end runs.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ruff's lint rules and formatting, as configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The systems benchmarks at full size (25-40 minutes on 2 CPU cores); tables print, results
# go to results/*.json, and BENCHMARKS.md holds the figures.
bench-systems: setup
	for b in wire_bytes aggregation client_codec masked_step federation_overhead scaling many_clients parallel_candidates; do \
	    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python bench/$$b.py --out results/$$b.json || exit 1; done

# The quality benchmarks of BENCHMARKS.md: the paper table on MNIST-1D (about 40 minutes on 2
# CPU cores, seeds in 2 processes), then the federated soups against masked FedAvg (about 35 minutes).
bench-quality: setup
	$(BIN)/python bench/quality.py --data-dir runs/data --out results/quality
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python bench/federated.py --data-dir runs/data --out results/federated

# Everything the install, the demo, the tests and lint create (results/ holds benchmark
# outputs you asked for; remove it yourself).
clean:
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
