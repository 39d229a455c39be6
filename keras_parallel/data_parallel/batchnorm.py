"""Global-batch statistics for BatchNormalization under data parallelism.

Each replica sees 1/N of the batch; normalising with that slice's mean and
variance changes the numbers (measured with MirroredStrategy on 4 devices:
max |dw| 1.1e-2 after two epochs). Keras' `synchronized=True` all-reduces
sums of x and x² and takes E[x²] − E[x]², which loses the variance's digits
when the mean is large against the spread, launches three all-reduces per
layer, and is skipped altogether for masked inputs.

Here every replica computes its count, mean (with the rounding error of the
mean, as in the corrected two-pass algorithm) and sum of squared deviations
over its own piece; one all-gather brings those rows together, where they
are merged once for every replica with the pairwise formula of Chan, Golub
and LeVeque (1979):
n = Σnᵢ, μ = Σnᵢμᵢ/n, M2 = ΣM2ᵢ + Σnᵢ(μᵢ − μ)², the μᵢ − μ taken as offsets
from a common base so that no digits cancel. Its gradient is one
all-reduce. Masks weight the samples as in Keras' masked moments.
"""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf

from keras_parallel._tf_internal import sublayers


class GlobalStatistics:
    """Put before a BatchNormalization layer's class while DataParallel
    traces a step (see `specialize.py`): its moments are the global batch's."""

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        # The strategy's own count: a Keras step's replica reads 1
        # (`loss_weights`).
        if context is None or context.strategy.extended._num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        weights = None
        if mask is not None:
            weights = tf.cast(tf.expand_dims(mask, -1), inputs.dtype)
            weights = tf.broadcast_to(weights, tf.shape(inputs))
        # A padding sample (`empty_pieces`) weighs nothing.
        has_samples = context.strategy.extended.replica_has_samples()
        if has_samples is not None:
            weights = tf.cast(has_samples, inputs.dtype) * (
                tf.ones_like(inputs) if weights is None else weights
            )
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

    def weighted_sum(value):
        if weights is not None:
            value = weights * value
        return tf.reduce_sum(value, axes, keepdims=True)

    # Statistics keep the reduced axes (size 1) so that they broadcast
    # against `x` without reshapes.
    sums = weighted_sum(x)
    count = _count(x, axes, sums, weights)
    mean = tf.math.divide_no_nan(sums, count)
    deviation = x - mean
    # The rounding error of `mean`, recovered from the deviations (exact by
    # Sterbenz's lemma near the mean): the corrected two-pass algorithm.
    residual = tf.math.divide_no_nan(weighted_sum(deviation), count)
    squares = weighted_sum(tf.square(deviation)) - count * tf.square(residual)
    row = tf.expand_dims(tf.stack([count, mean, residual, squares]), 0)
    shape = [d for i, d in enumerate(x.shape) if i not in axes]
    # Every replica would merge the same rows: they are merged once, where
    # they are gathered (with `_count`'s constant, 2.5 k fewer nodes in a
    # MobileNetV2 step of 35 k, each of them traced and optimized by the
    # first `fit`). What is not a tensor is bound here: merge_call would
    # regroup each replica's own into a PerReplica.
    merge = functools.partial(_merged_moments, row_shape=row.shape[1:], shape=shape)
    merged = tf.distribute.get_replica_context().merge_call(merge, args=(row,))
    return _with_gradient(x, weights, *merged)


def _count(x, axes, sums, weights):
    """The samples behind each of `sums` (weighted), shaped like it."""
    if weights is not None:
        return tf.reduce_sum(weights, axes, keepdims=True)
    sizes = [x.shape[a] for a in axes]
    if None not in sizes and sums.shape.is_fully_defined():
        # A constant when tracing knows the shape (the first trace of a step).
        return tf.constant(float(math.prod(sizes)), x.dtype, sums.shape)
    elements = tf.reduce_prod(tf.gather(tf.shape(x), axes))
    return tf.fill(tf.shape(sums), tf.cast(elements, x.dtype))


def _merged_moments(strategy, row, row_shape, shape):
    """Cross-replica: the global moments from every replica's `row` (of
    `[1, *row_shape]`), merged with the pairwise formula where the rows are
    gathered.

    Returns:
        (total count, mean, mean of `shape`, variance of `shape`); the first
        two keep the reduced axes, for the gradient.
    """
    gathered = strategy.gather(row, axis=0)
    with tf.device(gathered.device):
        # Across workers the gather's static shape is lost.
        rows = tf.ensure_shape(
            gathered, [strategy.extended._num_replicas_in_sync, *row_shape]
        )
        counts, means, residuals, squares = tf.unstack(rows, axis=1)
        total = tf.reduce_sum(counts, 0)
        # Replicas' means as offsets from a common base, with their
        # residuals: differences of close numbers are exact, so no digits
        # cancel.
        base = tf.math.divide_no_nan(tf.reduce_sum(counts * means, 0), total)
        offsets = (means - base) + residuals
        shift = tf.math.divide_no_nan(tf.reduce_sum(counts * offsets, 0), total)
        spread = tf.reduce_sum(squares, 0) + tf.reduce_sum(
            counts * tf.square(offsets - shift), 0
        )
        mean = base + shift
        variance = tf.math.divide_no_nan(spread, total)
        return total, mean, tf.reshape(mean, shape), tf.reshape(variance, shape)


def _with_gradient(x, weights, total, kept_mean, mean, variance):
    """`mean` and `variance` (the global moments, computed from every
    replica's `x`) with the closed-form gradient for this replica's `x`.

    Differentiating the merge formula op by op would add ~160 nodes per
    layer and replica (a MobileNetV2 step graph grew from 11 k to 28 k nodes
    and its first step took twice as long). The global moments' gradient is
    that of one device's moments: dμ/dx = w/n, dσ²/dx = 2w(x − μ)/n, with
    the upstream gradients summed over the replicas (every replica's loss
    uses the same μ and σ²): one all-reduce.
    """

    @tf.custom_gradient
    def moments(x, mean, variance):
        # The moments enter as arguments: tf.custom_gradient searches the
        # graph between a function's inputs and outputs for variables, and
        # from a value computed from every replica that search would cover
        # the other replicas' whole graphs, once per layer.

        def gradient(upstream_mean, upstream_variance):
            # An output this replica's loss does not use has no gradient here,
            # but the other replicas' may: every replica joins the sum.
            upstream = tf.stack(
                [
                    tf.zeros_like(mean) if g is None else g
                    for g in (upstream_mean, upstream_variance)
                ]
            )
            context = tf.distribute.get_replica_context()
            summed = context.merge_call(_sum, args=(upstream,))
            summed = tf.reshape(summed, [2, *kept_mean.shape])
            summed_mean, summed_variance = tf.unstack(
                tf.math.divide_no_nan(summed, total)
            )
            per_element = summed_mean + 2.0 * summed_variance * (x - kept_mean)
            return (
                (per_element if weights is None else weights * per_element),
                None,
                None,
            )

        return (mean, variance), gradient

    return moments(x, mean, variance)


def _sum(strategy, value):
    return strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, value, value)
