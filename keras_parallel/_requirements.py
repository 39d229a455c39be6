"""Import-time checks that TensorFlow is installed and Keras runs on it."""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def check_requirements() -> None:
    """Raises ImportError with a fix when TensorFlow or the Keras backend is wrong."""
    # Looked up, not imported: `keras-parallel launch` must start at once.
    if not _installed("tensorflow"):
        raise ImportError(
            "keras_parallel needs TensorFlow, which is not installed. Install "
            "it with the package: `pip install keras-parallel[cpu]` "
            "(tensorflow-cpu) or `pip install keras-parallel[gpu]` "
            "(tensorflow, with CUDA on Linux)."
        )
    backend = _keras_backend()
    if backend != "tensorflow":
        raise ImportError(
            f"keras_parallel needs Keras on the TensorFlow backend, but Keras "
            f"is using {backend!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before Keras is first imported (or set "
            '"backend": "tensorflow" in ~/.keras/keras.json) and restart.'
        )


def _installed(name: str) -> bool:
    if name in sys.modules:  # None there means "import blocked"
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _keras_backend() -> str:
    """The backend Keras runs on, or will pick when imported.

    Read without importing Keras when it is not loaded yet: importing it on a
    backend whose package is missing would fail with that package's error.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as config:
            return json.load(config).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"
