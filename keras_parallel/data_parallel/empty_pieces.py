"""A replica whose piece of a batch is empty computes on a sample that counts
for nothing.

A batch of fewer samples than replicas (`predict(x[:1])`, the last batch of
an epoch) leaves some replicas with no sample. tf.distribute hands them empty
tensors, which many models cannot take: oneDNN's convolution gradient fails
("Missing 1-th output from Conv2DBackpropFilter"), a `Flatten` cannot infer
its size from zero elements, BatchNormalization's moments of no samples are
NaN. In a Keras step DataParallel gives such a replica one sample of the
batch instead and keeps it out of everything the step produces: its loss
weight is its share of the batch, 0 (`loss_weights`), its metric updates are
skipped (`metric_results`), BatchNormalization gives it weight 0 in the
global moments (`batchnorm`), and its rows are cut from `predict`'s output.
Custom loops keep tf.distribute's empty pieces, as under MirroredStrategy.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel._tf_internal import PerReplica
from keras_parallel.data_parallel.batch_split import if_has_samples


class EmptyPieces:
    """The real sizes of the local replicas' pieces in the step being traced."""

    def __init__(self):
        self._sizes: list | None = None

    @contextlib.contextmanager
    def step(self, sizes: list | None):
        """The context of one traced Keras step.

        Args:
            sizes: Samples in each local replica's piece (`piece_sizes`), or
                None when the step takes no per-replica input.
        """
        self._sizes = None if sizes is None or all(_known(s) for s in sizes) else sizes
        try:
            yield
        finally:
            self._sizes = None

    def pad(self, args):
        """`args` with each replica's empty piece replaced by one sample of
        the batch (the first sample the local replicas hold)."""
        if self._sizes is None:
            return args

        def pad_leaf(value):
            if not isinstance(value, PerReplica):
                return value
            parts = value.values
            padded = []
            for part, size in zip(parts, self._sizes, strict=True):
                with tf.device(part.device):
                    piece = if_has_samples(
                        size,
                        lambda part=part: tf.identity(part),
                        lambda part=part: _first_sample(parts, part.device),
                    )
                    # A tf.cond loses the static shape, which Keras' layers
                    # read (a Dense kernel's gradient would lose its own).
                    padded.append(tf.ensure_shape(piece, [None, *part.shape[1:]]))
            return PerReplica(tuple(padded))

        return tf.nest.map_structure(pad_leaf, args)

    def has_samples(self, replica: int) -> tf.Tensor | None:
        """Whether local replica `replica` has samples (a bool tensor), or
        None when every piece of the step is known not to be empty."""
        if self._sizes is None:
            return None
        return self._sizes[replica] > 0

    def trim(self, outputs):
        """`predict` outputs without the rows of padding samples."""
        if self._sizes is None:
            return outputs

        def trim_leaf(value):
            if not isinstance(value, PerReplica) or any(
                part.shape.rank == 0 for part in value.values
            ):
                return value
            trimmed = []
            for part, size in zip(value.values, self._sizes, strict=True):
                with tf.device(part.device):
                    trimmed.append(part[:size])
            return PerReplica(tuple(trimmed))

        return tf.nest.map_structure(trim_leaf, outputs)


def _known(size) -> bool:
    """Whether a piece of `size` samples is known, while tracing, to hold
    at least one."""
    value = tf.get_static_value(size)
    return value is not None and value > 0


def _first_sample(parts, device: str) -> tf.Tensor:
    with tf.device(device):
        return tf.concat([part[:1] for part in parts], axis=0)[:1]
