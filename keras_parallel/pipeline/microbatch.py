"""Micro-batches: a batch cut into pieces that flow through the stages one
after another, so that stage k works on piece i while stage k+1 works on
piece i-1 (GPipe, Huang et al., 2019).

The pieces are cut from the batch and their outputs joined again inside the
model's call, so the loss, metrics and gradients see the whole batch: for
layers without batch statistics the result equals the unsplit call. No
explicit schedule is needed: TensorFlow runs each op once its inputs exist,
and the stages sit on different devices. A batch with fewer samples than
pieces leaves pieces empty; those never reach the model
(`empty_pieces.py`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import tensorflow as tf

from keras_parallel._tf_internal import TakenLosses
from keras_parallel.pipeline import keras_meta
from keras_parallel.pipeline.empty_pieces import unless_empty


def piece_sizes(batch_size, num_microbatches: int) -> tf.Tensor:
    """Sizes of the pieces of a batch; the first `batch_size % M` pieces
    hold one sample more (only a short last batch is uneven), and a batch
    of fewer than M samples leaves the last pieces empty."""
    base = batch_size // num_microbatches
    extra = tf.cast(
        tf.range(num_microbatches) < batch_size % num_microbatches, tf.int32
    )
    return base + extra


def _batched(inputs) -> list:
    return [
        x for x in tf.nest.flatten(inputs) if isinstance(x, tf.Tensor) and x.shape.rank
    ]


def split(inputs, num_microbatches: int) -> list:
    """Cuts every tensor of the nest `inputs` along axis 0 into
    `num_microbatches` pieces; returns one nest per piece."""
    leaves = tf.nest.flatten(inputs)
    tensors = _batched(inputs)
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
    """Concatenates the per-piece outputs (nests of equal structure), with
    the Keras masks and logits the pieces carry."""
    if len(outputs) == 1:
        return outputs[0]
    joined = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *outputs)
    pieces = [tf.nest.flatten(output) for output in outputs]
    for index, tensor in enumerate(tf.nest.flatten(joined)):
        found = [keras_meta.metadata(piece[index]) for piece in pieces]
        keras_meta.attach(
            tensor,
            [
                tf.concat(parts, axis=0) if all(p is not None for p in parts) else None
                for parts in zip(*found, strict=True)
            ],
        )
    return joined


def microbatched(
    call, num_microbatches: int, layers: Sequence = (), piece=None, full=False
):
    """Wraps a model's `call` to run each batch as `num_microbatches` pieces.

    Args:
        call: The model's own `call`.
        num_microbatches: Pieces per batch.
        layers: The model and its sublayers: the losses they add in `call`
            (activity regularizers) are kept for a piece that may be empty,
            each weighted by its piece's share of the batch.
        piece: `piece(i)` gives the context piece i is traced in
            (`StepTrace.piece`); None for none.
        full: Whether the batch is known to have at least
            `num_microbatches` samples, so that no piece is empty.

    Returns:
        The wrapped call. The first piece always runs; piece i runs only if
        the batch has more than i samples (decided while tracing when the
        batch size is known, else when the step runs).
    """

    @functools.wraps(call)
    def wrapped(inputs, *args, **kwargs):
        pieces = split(inputs, num_microbatches)
        tensors = _batched(inputs)
        batch = tf.shape(tensors[0])[0] if tensors else None
        known = None if batch is None else tf.get_static_value(batch)
        shares = piece_shares(batch, num_microbatches)
        scope = piece or (lambda i: contextlib.nullcontext())
        with _losses_weighted(layers, shares[0]), scope(0):
            outputs = [call(pieces[0], *args, **kwargs)]
        for i, part in enumerate(pieces[1:], start=1):
            if batch is None or full:
                # Nothing to cut (every piece is the input), or no piece empty.
                has_samples = True
            elif known is not None:
                has_samples = bool(known > i)
            else:
                has_samples = batch > i
            with _losses_weighted(layers, shares[i]), scope(i):
                output = unless_empty(
                    has_samples,
                    functools.partial(call, part, *args, **kwargs),
                    layers,
                    like=outputs[0],
                )
            if output is not None:
                outputs.append(output)
        return join(outputs)

    wrapped.__keras_parallel_microbatches__ = num_microbatches
    return wrapped


def piece_shares(batch, num_microbatches: int) -> list:
    """Each piece's share n_i / n of the batch (1 / M when nothing is cut:
    every piece is the whole input)."""
    if batch is None:
        return [1.0 / num_microbatches] * num_microbatches
    sizes = tf.cast(piece_sizes(batch, num_microbatches), tf.float64)
    shares = sizes / tf.maximum(tf.cast(batch, tf.float64), 1.0)
    return tf.unstack(shares, num=num_microbatches)


@contextlib.contextmanager
def _losses_weighted(layers: Sequence, share):
    """The losses `layers` add while the context is open (activity
    regularizers, `add_loss`) weighted by the piece's share of the batch.

    Keras divides an activity regularizer by the batch it sees, and a loss a
    layer adds is a mean over its call's batch: on one device the whole
    batch's is sum_i n_i / n * (piece i's), so a piece's counts by its share,
    as DataParallel weighs a replica's loss.
    """
    with TakenLosses(layers) as taken:
        yield
    for layer, loss in taken.losses:
        layer.add_loss(loss * tf.cast(share, loss.dtype))


def check_first_batch(dataset: tf.data.Dataset, num_microbatches: int) -> None:
    """Refuses a first batch whose size is not a multiple of
    `num_microbatches` when more batches follow. Only the last batch may be
    uneven: a short remainder, or the whole data when it is one batch (a
    `predict` on fewer samples than the batch size or than micro-batches);
    it is cut as evenly as possible and empty pieces are skipped."""
    count = int(dataset.cardinality())
    if 0 <= count <= 1:
        return
    # With an unknown length, a second batch tells whether the first is last.
    look = 2 if count == tf.data.UNKNOWN_CARDINALITY else 1
    batches = list(dataset.take(look))
    if len(batches) < look:
        return
    size = int(tf.shape(tf.nest.flatten(batches[0])[0])[0])
    if size % num_microbatches:
        raise ValueError(
            f"The batch size, {size}, is not a multiple of "
            f"num_microbatches={num_microbatches}, so the micro-batches would "
            f"differ in size. Use a batch_size that is a multiple of "
            f"{num_microbatches} (for example "
            f"{max(num_microbatches, size - size % num_microbatches)})."
        )
