"""A generated batch shaped like a model's inputs, for measuring a model
without its data (`partition="time"`, `plan`)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def sample_inputs(model: keras.Model, batch_size: int = 32):
    """A batch shaped like `model`'s inputs, in their structure (dict, list):
    `sample_like` for each.

    Raises:
        ValueError: Keras knows none of the model's inputs (a subclassed
            model never called on a `keras.Input`).
    """
    try:
        spec = model.input  # a Functional model's structure (dict, list)
    except (AttributeError, ValueError):
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(
                f"Keras knows none of {model.name!r}'s inputs (a subclassed "
                "model): a batch shaped like them cannot be made."
            ) from None
        spec = inputs[0] if len(inputs) == 1 else list(inputs)
    rng = np.random.RandomState(0)
    return keras.tree.map_structure(
        lambda x: sample_like(x.shape, x.dtype, batch_size, rng), spec
    )


def sample_like(shape, dtype, batch_size: int, rng: np.random.RandomState) -> tf.Tensor:
    """A tensor of `shape` (its first axis `batch_size` unless fixed, 16
    along another axis left unknown, a sequence's) and `dtype`: floats
    uniform in [0, 1) from `rng` (seeded NumPy: TensorFlow's and Keras'
    random state stay untouched), other dtypes zeros (0 is a valid id for
    any Embedding and a valid class index)."""
    shape = [
        (batch_size if axis == 0 else 16) if size is None else size
        for axis, size in enumerate(shape)
    ]
    dtype = tf.as_dtype(dtype)
    if dtype.is_floating:
        return tf.cast(rng.uniform(size=shape).astype(np.float32), dtype)
    return tf.zeros(shape, dtype)
