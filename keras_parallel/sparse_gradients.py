"""Arithmetic on gradients that may be sparse (`tf.IndexedSlices`, an
Embedding's rows), keeping them sparse."""

from __future__ import annotations

import tensorflow as tf


def times(gradient, weight):
    """`gradient` times the scalar `weight`."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(weight, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(weight, gradient.dtype)


def plus(a, b):
    """`a + b` (either may be None, for no gradient), on `b`'s device. Two
    sparse gradients give their rows one after the other, as one device's
    gradient of a batch holds them, repeats included."""
    if a is None or b is None:
        return b if a is None else a
    with tf.device(b.device):
        if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
            return tf.IndexedSlices(
                tf.concat([a.values, b.values], 0),
                tf.concat([a.indices, b.indices], 0),
                a.dense_shape,
            )
        return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)
