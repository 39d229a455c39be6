"""Splits the CPU into 4 logical devices before TensorFlow initialises.

Tests that need another layout run in a subprocess (see `run_python`).
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras_parallel  # noqa: E402

NUM_DEVICES = 4
keras_parallel.virtual_devices(NUM_DEVICES)

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Each test starts and ends with Keras' default dtype policy."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def run_python(code: str, timeout: float = 300, env: dict | None = None):
    """Runs `code` in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


# Longest first: under `pytest -n 2` a notebook or a real architecture that
# starts last keeps one worker busy for a minute while the other has nothing
# left to run (the suite's slowest modules, measured with --durations).
_LONGEST_FIRST = ("test_notebooks.py", "test_real_models.py", "test_multi_worker.py")


def pytest_collection_modifyitems(items):
    order = {name: rank for rank, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))
