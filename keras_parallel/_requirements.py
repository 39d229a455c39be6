"""Import-time checks that TensorFlow is installed and Keras runs on it."""

from __future__ import annotations

import importlib.util


def check_requirements() -> None:
    """Raises ImportError with a fix when TensorFlow or the Keras backend is wrong."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            "keras_parallel needs TensorFlow, which is not installed. Install "
            "it with the package: `pip install keras-parallel[cpu]` "
            "(tensorflow-cpu) or `pip install keras-parallel[gpu]` "
            "(tensorflow, with CUDA on Linux)."
        )
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"keras_parallel needs Keras on the TensorFlow backend, but Keras "
            f"is using {backend!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before Keras is first imported (or set "
            '"backend": "tensorflow" in ~/.keras/keras.json) and restart.'
        )
