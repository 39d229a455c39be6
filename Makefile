# `make demo` and `make test` each create (or refresh) .venv and install what they need;
# `make docs` builds the site into site/ (strict: a broken link or reference fails).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
export TF_CPP_MIN_LOG_LEVEL ?= 3

# The oldest TensorFlow/Keras pair setup.cfg allows, and the tests of equality
# with one device that must pass on it (`.ci/run` runs both targets).
OLDEST_VENV := .venv-oldest
OLDEST := tensorflow-cpu==2.16.1 keras==3.14.0
CORE_TESTS := tests/test_tf_internal.py tests/test_requirements.py \
	tests/test_optimizer_options.py tests/data_parallel/test_data_parallel.py \
	tests/pipeline/test_pipeline_parallel.py tests/layers tests/mesh \
	tests/data_parallel/test_periodic_averaging.py tests/test_keras_patterns.py \
	tests/data_parallel/test_small_batches.py tests/pipeline/test_short_batches.py \
	tests/test_fit_api.py

.PHONY: demo test test-oldest bench lint docs notebooks clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[cpu,test]"
	# tf_keras for the one test of Keras' tf.distribute tests that uses it
	# (tests/test_keras_distribute_tests.py); --no-deps: it names the
	# `tensorflow` package, which tensorflow-cpu provides.
	$(VENV)/bin/python -m pip install -q --no-deps "tf_keras~=$$($(VENV)/bin/python -c 'import tensorflow as tf; print(tf.__version__.rsplit(".", 1)[0])').0"
	touch $(STAMP)

$(OLDEST_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[test]" $(OLDEST)
	touch $@

$(DOCS_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install -q -e ".[docs]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/keras-parallel demo

# Three workers on two cores: a worker waiting on a notebook kernel or on the
# processes of a multi-worker test leaves its core to the others (the suite
# took 17 min against 20 with -n 2 on the 2-core CI machine).
test: $(STAMP)
	$(VENV)/bin/ruff check keras_parallel tests benchmarks examples
	$(VENV)/bin/python -m pytest -q -n 3 --dist worksteal tests

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q -n 2 $(CORE_TESTS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_time.py
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/overhead_parts.py
	$(VENV)/bin/python benchmarks/first_fit.py
	$(VENV)/bin/python benchmarks/compression.py
	$(VENV)/bin/python benchmarks/overlap.py
	$(VENV)/bin/python benchmarks/model_parallel.py
	$(VENV)/bin/python benchmarks/pipeline_timeline.py
	$(VENV)/bin/python benchmarks/pipeline_partition.py
	$(VENV)/bin/python benchmarks/pipeline_memory.py
	$(VENV)/bin/python benchmarks/remat.py
	$(VENV)/bin/python benchmarks/mesh.py
	$(VENV)/bin/python benchmarks/xla.py
	$(VENV)/bin/python benchmarks/sharding.py
	$(VENV)/bin/python benchmarks/multi_worker.py
	$(VENV)/bin/python benchmarks/local_sgd.py
	$(VENV)/bin/python benchmarks/parameter_server.py
	$(VENV)/bin/python benchmarks/compatibility.py

# The site shows the notebooks' stored outputs: `make notebooks` runs them again
# and stores what they print and plot (tests/test_notebooks.py runs them too).
docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict

notebooks: $(DOCS_STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=900 notebooks/*.ipynb

lint: $(STAMP)
	$(VENV)/bin/ruff check keras_parallel tests benchmarks examples

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build site *.egg-info
