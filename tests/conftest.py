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


@pytest.fixture
def float64():
    """Keras computes in float64 during the test (where float32 rounding
    would hide a real difference or show a false one)."""
    keras.backend.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    yield
    keras.backend.set_floatx("float32")
    keras.mixed_precision.set_global_policy("float32")


LAUNCH_TIMEOUT = 240


def cluster_env(**extra: str) -> dict:
    """The environment for a task of a cluster a test starts: this process's,
    without its TF_CONFIG, TensorFlow quiet, with `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def launch_task(task, out, *args: str, workers: int = 2, options=(), **env: str):
    """`keras-parallel launch -n workers *options task out *args` (`env`: extra
    variables), bounded by a timeout; the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "keras_parallel", "launch", "-n", str(workers)]
        + [*options, str(task), str(out), *args],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=cluster_env(**env),
    )


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
