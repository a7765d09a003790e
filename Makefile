# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test proof lint bench bench-compare screenshot clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flows.demo

# Two pytest-xdist workers (the slow end-to-end tests one after another in one of them; see
# tests/conftest.py); PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The standing proofs alone (several workers, kill -9, SIGTERM, outage, contention).
proof: $(STAMP)
	TRACKING_TEST_POSTGRES_URL=$${TRACKING_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test} \
		$(BIN)/python -m pytest tests/prefect/test_proof_workers.py tests/prefect/test_proof_crash.py \
		tests/prefect/test_proof_outage.py tests/prefect/test_proof_contention.py \
		tests/prefect/test_flow_reliability.py tests/integration/test_properties.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_store.py

# This project against the seed library rpa-tracker 0.0.18 (in a venv of its own under build/)
# on the same workload; writes bench/RESULTS.md. COMPARE_ARGS=--quick for a smoke run.
bench-compare: $(STAMP)
	$(BIN)/python bench/compare.py $(COMPARE_ARGS)

# The HTML report of a sample scenario, and a headless Chromium screenshot of it (checked not blank).
screenshot: $(STAMP)
	$(BIN)/python -m tools.report_screenshot build/report-sample.html build/report-sample.png

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
