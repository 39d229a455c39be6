# `make demo` and `make test` each create (or refresh) .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test bench lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[cpu,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/keras-parallel demo

test: $(STAMP)
	$(VENV)/bin/ruff check keras_parallel tests benchmarks examples
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_time.py
	$(VENV)/bin/python benchmarks/compression.py
	$(VENV)/bin/python benchmarks/model_parallel.py
	$(VENV)/bin/python benchmarks/multi_worker.py
	$(VENV)/bin/python benchmarks/compatibility.py

lint: $(STAMP)
	$(VENV)/bin/ruff check keras_parallel tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
