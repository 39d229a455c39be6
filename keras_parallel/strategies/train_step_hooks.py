"""Hooks DataParallel sets on a Keras model's optimizer while it traces the
model's train step.

Exact gradients when replicas hold different numbers of samples: Keras
averages each replica's loss over its own samples and scales it by 1/N, so
summing the replicas' gradients gives the single-device gradient only when
every replica holds n/N samples. A global batch that does not split evenly (or
a short last batch) breaks that: MirroredStrategy and PyTorch DDP then weight
a replica with fewer samples as much as one with more. Scaling replica i's
loss by N * n_i / n makes the sum exactly the gradient of the mean over all n
samples, also through BatchNormalization's all-reduced statistics.

Which reduction is the gradients': the optimizer all-reduces gradients inside
`optimizer.apply`; BatchNormalization's statistics are all-reduced in the
forward and backward passes. Only the former may be compressed.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from tensorflow.python.distribute import values as values_lib


def replica_sample_weights(args, num_replicas: int) -> tf.Tensor | None:
    """N * n_i / n for each replica i, from the first per-replica tensor in
    `args`, or None when `args` holds no per-replica tensor."""
    for leaf in tf.nest.flatten(args, expand_composites=False):
        if isinstance(leaf, values_lib.PerReplica):
            sizes = []
            for part in leaf.values:
                # Read on the piece's own device: a Shape op elsewhere would
                # copy the whole piece there first.
                with tf.device(part.device):
                    sizes.append(tf.shape(part)[0])
            sizes = tf.cast(tf.stack(sizes), tf.float32)
            return num_replicas * sizes / tf.reduce_sum(sizes)
    return None


@contextlib.contextmanager
def weighted_losses(model: keras.Model, weights: tf.Tensor | None):
    """While a train step is traced, scales each replica's loss by its weight.

    The hook is `optimizer.scale_loss`, which Keras' `train_step` applies to
    the loss inside the gradient tape after the loss metric is updated, so
    metrics keep their plain values.
    """
    optimizer = getattr(model, "optimizer", None)
    if weights is None or optimizer is None:
        yield
        return
    unweighted = optimizer.scale_loss

    def scale_loss(loss):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        weight = tf.cast(tf.gather(weights, replica), loss.dtype)
        return unweighted(loss * weight)

    optimizer.scale_loss = scale_loss
    try:
        yield
    finally:
        del optimizer.scale_loss


@contextlib.contextmanager
def marked_gradient_reduction(model: keras.Model, marker: list):
    """While a train step is traced, `marker[0]` counts the replicas inside
    `optimizer.apply`, where the gradients are all-reduced."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        yield
        return
    unmarked = optimizer.apply

    def apply(*args, **kwargs):
        marker[0] += 1
        try:
            return unmarked(*args, **kwargs)
        finally:
            marker[0] -= 1

    optimizer.apply = apply
    try:
        yield
    finally:
        del optimizer.apply
