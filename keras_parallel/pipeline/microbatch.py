"""Micro-batches: a batch cut into pieces that flow through the stages one
after another, so that stage k works on piece i while stage k+1 works on
piece i-1 (GPipe, Huang et al., 2019).

The pieces are cut from the batch and their outputs joined again inside the
model's call, so the loss, metrics and gradients see the whole batch: for
layers without batch statistics the result equals the unsplit call. No
explicit schedule is needed: TensorFlow runs each op once its inputs exist,
and the stages sit on different devices.
"""

from __future__ import annotations

import functools

import tensorflow as tf


def piece_sizes(batch_size, num_microbatches: int) -> tf.Tensor:
    """Sizes of the pieces of a batch; the first `batch_size % M` pieces
    hold one sample more (only a short last batch is uneven)."""
    base = batch_size // num_microbatches
    extra = tf.cast(
        tf.range(num_microbatches) < batch_size % num_microbatches, tf.int32
    )
    return base + extra


def split(inputs, num_microbatches: int) -> list:
    """Cuts every tensor of the nest `inputs` along axis 0 into
    `num_microbatches` pieces; returns one nest per piece."""
    leaves = tf.nest.flatten(inputs)
    tensors = [x for x in leaves if isinstance(x, tf.Tensor) and x.shape.rank]
    if not tensors:
        return [inputs] * num_microbatches
    sizes = piece_sizes(tf.shape(tensors[0])[0], num_microbatches)
    cut = {id(x): tf.split(x, sizes, num=num_microbatches) for x in tensors}
    return [
        tf.nest.pack_sequence_as(
            inputs, [cut[id(x)][i] if id(x) in cut else x for x in leaves]
        )
        for i in range(num_microbatches)
    ]


def join(outputs: list):
    """Concatenates the per-piece outputs (nests of equal structure)."""
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *outputs)


def microbatched(call, num_microbatches: int):
    """Wraps a model's `call` to run each batch as `num_microbatches` pieces."""

    @functools.wraps(call)
    def wrapped(inputs, *args, **kwargs):
        batch = tf.nest.flatten(inputs)[0].shape[0]
        if batch is not None and batch % num_microbatches:
            raise ValueError(
                f"A batch of {batch} samples does not split into "
                f"num_microbatches={num_microbatches} equal micro-batches. Use "
                f"a batch_size that is a multiple of {num_microbatches}."
            )
        pieces = split(inputs, num_microbatches)
        return join([call(piece, *args, **kwargs) for piece in pieces])

    wrapped.__keras_parallel_microbatches__ = num_microbatches
    return wrapped
