"""Cutting a tensor into equal parts by rows (its first axis).

Optimizer state split over replicas and reduce-scattered gradients use the
same cut: part r of N holds rows [r * k, (r + 1) * k), k = ceil(rows / N),
the last ones zero-padded, so every part has one shape.
"""

from __future__ import annotations

import tensorflow as tf


def num_rows(shape: tf.TensorShape) -> int:
    """Rows of a value of `shape` (a scalar is one row)."""
    return shape[0] if shape.rank else 1


def row_parts(value, num_parts: int) -> list:
    """`value` (a tensor, or a sparse gradient) cut along its first axis into
    `num_parts` parts of equal row counts; a sparse gradient stays sparse,
    its rows re-indexed within each part (so an optimizer's sparse update
    adds repeated rows as on one device)."""
    return [row_part(value, num_parts, r) for r in range(num_parts)]


def row_part(value, num_parts: int, index: int):
    """Part `index` of `row_parts(value, num_parts)`, without making the
    others (a step updates its own part of every weight)."""
    if isinstance(value, tf.IndexedSlices):
        shape = tf.TensorShape(tf.get_static_value(value.dense_shape))
        size = -(-shape[0] // num_parts)
        local = value.indices - index * size
        held = tf.logical_and(local >= 0, local < size)
        return tf.IndexedSlices(
            tf.boolean_mask(value.values, held),
            tf.boolean_mask(local, held),
            tf.constant([size, *shape[1:]], value.dense_shape.dtype),
        )
    value = tf.convert_to_tensor(value)
    if not value.shape.rank:
        value = tf.reshape(value, [1])
    rows = value.shape[0]
    size = -(-rows // num_parts)
    start = min(index * size, rows)
    stop = min(start + size, rows)
    part = value[start:stop]
    if stop - start < size:
        padding = [[0, size - (stop - start)]] + [[0, 0]] * (value.shape.rank - 1)
        part = tf.pad(part, padding)
    return part


def join_rows(parts, shape: tf.TensorShape) -> tf.Tensor:
    """The value of `shape` whose `row_parts` are `parts` (on the current
    device)."""
    joined = tf.concat(list(parts), axis=0)
    # Only padding rows are cut and only a value of another shape (a scalar,
    # as one row) is reshaped: an op the graph does not need is still traced
    # and optimized.
    if joined.shape[0] != num_rows(shape):
        joined = joined[: num_rows(shape)]
    if not (joined.shape.is_fully_defined() and joined.shape == shape):
        joined = tf.reshape(joined, shape)
    return joined
