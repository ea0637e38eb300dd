# Quick start: `make demo` (set up + run the embedded demo line end to end), `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test test-fast lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,ray]"
	touch $@

demo: setup
	dvc repro report@demo
	dvc metrics show reports/demo/metrics.json
	@echo "Report: reports/demo/model_card.md, overlays in reports/demo/overlays/"

test: setup
	$(PY) -m pytest -q

# the suite without the end-to-end, DVC and Ray tests (marked slow): a few minutes on 2 cores, for the edit loop
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/bench_matching.py
	$(PY) benchmarks/bench_pts.py
	$(PY) benchmarks/bench_inference.py
