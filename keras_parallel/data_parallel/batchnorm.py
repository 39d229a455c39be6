"""Global-batch statistics for BatchNormalization under data parallelism.

Each replica sees 1/N of the batch; normalising with that slice's mean and
variance changes the numbers (measured with MirroredStrategy on 4 devices:
max |dw| 1.1e-2 after two epochs). Keras' `synchronized=True` all-reduces
sums of x and x² and takes E[x²] − E[x]², which loses the variance's digits
when the mean is large against the spread, launches three all-reduces per
layer, and is skipped altogether for masked inputs.

Here every replica computes its count, mean (with the rounding error of the
mean, as in the corrected two-pass algorithm) and sum of squared deviations
over its own piece; one all-gather exchanges those rows and each replica
merges them with the pairwise formula of Chan, Golub and LeVeque (1979):
n = Σnᵢ, μ = Σnᵢμᵢ/n, M2 = ΣM2ᵢ + Σnᵢ(μᵢ − μ)², the μᵢ − μ taken as offsets
from a common base so that no digits cancel. Its gradient is one
all-reduce. Masks weight the samples as in Keras' masked moments.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_parallel._tf_internal import sublayers


class GlobalStatistics:
    """Put before a BatchNormalization layer's class while DataParallel
    traces a step (see `specialize.py`): its moments are the global batch's."""

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        weights = None
        if mask is not None:
            weights = tf.cast(tf.expand_dims(mask, -1), inputs.dtype)
            weights = tf.broadcast_to(weights, tf.shape(inputs))
        rank = len(inputs.shape)
        axes = [i for i in range(rank) if i != self.axis % rank]
        return global_moments(inputs, axes, weights)


def batch_norm_layers(models) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers of `models` (nested ones included)."""
    return [
        layer
        for model in models
        for layer in sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def global_moments(x, axes, weights=None):
    """Mean and variance of `x` over `axes` and over all replicas.

    Call in replica context. `weights` (broadcast like `x`, or None) weights
    each element, as a mask does.

    Returns:
        (mean, variance), each with the shape of `x` without `axes`.
    """
    axes = [a % x.shape.rank for a in axes]
    if weights is None:
        weights = tf.ones_like(x)
    count = tf.reduce_sum(weights, axes)
    mean = tf.math.divide_no_nan(tf.reduce_sum(weights * x, axes), count)
    deviation = x - _expand(mean, axes, x.shape.rank)
    # The rounding error of `mean`, recovered from the deviations (exact by
    # Sterbenz's lemma near the mean): the corrected two-pass algorithm.
    residual = tf.math.divide_no_nan(tf.reduce_sum(weights * deviation, axes), count)
    squares = tf.reduce_sum(weights * tf.square(deviation), axes)
    squares -= count * tf.square(residual)
    rows = _all_gather_rows(tf.stack([count, mean, residual, squares]))
    counts, means, residuals, squares = tf.unstack(rows, axis=1)
    total = tf.reduce_sum(counts, 0)
    # Replicas' means as offsets from a common base, with their residuals:
    # differences of close numbers are exact, so no digits cancel.
    base = tf.math.divide_no_nan(tf.reduce_sum(counts * means, 0), total)
    offsets = (means - base) + residuals
    shift = tf.math.divide_no_nan(tf.reduce_sum(counts * offsets, 0), total)
    spread = tf.reduce_sum(squares, 0) + tf.reduce_sum(
        counts * tf.square(offsets - shift), 0
    )
    return base + shift, tf.math.divide_no_nan(spread, total)


def _expand(value, axes, rank):
    for axis in sorted(axes):
        value = tf.expand_dims(value, axis)
    return value


def _all_gather_rows(row):
    """Stacks every replica's `row` (replica order) on every replica.

    The gradient of replica i's row is the sum over replicas of the gradient
    of the stack's i-th entry: one reduction.
    """
    context = tf.distribute.get_replica_context()
    rows = context.merge_call(_gather, args=(tf.expand_dims(row, 0),))
    # Across workers the gather's static shape is lost.
    rows = tf.ensure_shape(rows, [context.num_replicas_in_sync, *row.shape])
    return _differentiable_to(rows, row)


@tf.custom_gradient
def _differentiable_to(rows, row):
    # `rows` enters as an argument: tf.custom_gradient searches the graph
    # between a function's inputs and outputs for variables, and from a value
    # computed from every replica that search would cover the other replicas'
    # whole graphs, once per layer.
    context = tf.distribute.get_replica_context()

    def gradient(upstream):
        total = context.merge_call(_sum, args=(upstream,))
        return None, total[context.replica_id_in_sync_group]

    return tf.identity(rows), gradient


def _gather(strategy, rows):
    return strategy.gather(rows, axis=0)


def _sum(strategy, value):
    return strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, value, value)
