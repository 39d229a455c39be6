"""A micro-batch that may hold no sample runs under a `tf.cond`.

A batch smaller than the number of micro-batches (a short last batch, a
`predict` on one sample) leaves some pieces empty. An empty piece must not
reach the model: BatchNormalization's moments of no sample are NaN (they
would enter its moving statistics) and oneDNN's Conv2D returns a wrongly
shaped result for an empty batch. On one device such a piece does not
exist, so it is skipped: when the batch size is known while tracing, the
piece is left out; otherwise the model runs on it inside a `tf.cond` whose
other branch gives outputs with no sample.

What Keras keeps on Python objects during the call cannot leave a cond
branch as it is, so the branch returns it as outputs: the outputs' masks and
logits, and the losses the layers add (activity regularizers), which are
added again outside with `layer.add_loss` (zero when the piece is empty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from keras_parallel._tf_internal import TakenLosses
from keras_parallel.pipeline import keras_meta


def unless_empty(has_samples, run: Callable, layers: Sequence, like):
    """`run()` (one micro-batch through the model) only if the micro-batch
    has samples.

    Args:
        has_samples: A Python bool, or a boolean scalar tensor (decided when
            the step runs).
        run: Calls the model on the micro-batch and returns its outputs.
        layers: The model and its sublayers, whose added losses are kept.
        like: The outputs of a micro-batch with samples (the first), whose
            shapes give the empty outputs' other dimensions where those are
            not known while tracing.

    Returns:
        `run()`'s outputs, or None when `has_samples` is False; for a tensor,
        the outputs of a `tf.cond` with the nest, masks and logits of
        `run()`'s outputs, which have no sample when the piece is empty.
    """
    if isinstance(has_samples, bool):
        return run() if has_samples else None
    traced: dict = {}

    def with_samples():
        with TakenLosses(layers) as taken:
            outputs = run()
        flat = tf.nest.flatten(outputs)
        tensors = [x for x in flat if isinstance(x, tf.Tensor)]
        meta = [keras_meta.metadata(x) for x in tensors]
        losses = [loss for _, loss in taken.losses]
        # Where each result's empty version takes unknown dimensions from:
        # (index of the output in `like`, which metadata or None); None for
        # a loss, which is zero when the piece is empty.
        sources = [(i, None) for i in range(len(tensors))]
        sources += [
            (i, k)
            for i, values in enumerate(meta)
            for k, v in enumerate(values)
            if v is not None
        ]
        sources += [None] * len(losses)
        results = (
            tensors + [v for values in meta for v in values if v is not None] + losses
        )
        traced.update(
            outputs=outputs,
            flat=flat,
            flags=[[v is not None for v in values] for values in meta],
            loss_layers=[layer for layer, _ in taken.losses],
            results=results,
            sources=sources,
        )
        return results

    def without_samples():
        if not traced:
            raise RuntimeError(
                "tf.cond traced its false branch before its true branch; "
                "PipelineParallel's empty micro-batches need the opposite."
            )
        references = [x for x in tf.nest.flatten(like) if isinstance(x, tf.Tensor)]
        empty = []
        for result, source in zip(traced["results"], traced["sources"], strict=True):
            if source is None:  # a loss
                shape = result.shape if result.shape.is_fully_defined() else []
                empty.append(tf.zeros(shape, result.dtype))
                continue
            index, kind = source
            reference = references[index] if index < len(references) else None
            if kind is not None and reference is not None:
                reference = keras_meta.metadata(reference)[kind]
            empty.append(_empty(result, reference))
        return empty

    results = tf.cond(has_samples, with_samples, without_samples)
    return _rebuild(traced, list(results))


def _rebuild(traced: dict, results: list):
    """The cond's flat results back in the nest of the traced outputs, with
    their masks and logits, and the layers' losses added again."""
    results = iter(results)
    flat = [next(results) if isinstance(x, tf.Tensor) else x for x in traced["flat"]]
    tensors = [x for x in flat if isinstance(x, tf.Tensor)]
    for tensor, flags in zip(tensors, traced["flags"], strict=True):
        keras_meta.attach(tensor, [next(results) if f else None for f in flags])
    for layer in traced["loss_layers"]:
        layer.add_loss(next(results))
    return tf.nest.pack_sequence_as(traced["outputs"], flat)


def _empty(tensor, reference) -> tf.Tensor:
    """A tensor like `tensor` with no sample: its other dimensions from its
    static shape, else from `reference` (the same output of a piece with
    samples)."""
    shape = tensor.shape
    if shape.rank and shape[1:].is_fully_defined():
        return tf.zeros([0, *shape[1:]], tensor.dtype)
    if reference is None:
        raise ValueError(
            f"Cannot make an empty micro-batch output like {tensor!r}: its "
            "dimensions after the batch are not known while tracing."
        )
    return tf.zeros(tf.concat([[0], tf.shape(reference)[1:]], 0), tensor.dtype)
