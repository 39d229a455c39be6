"""Keras' metadata on a tensor: the mask of a masking layer and the logits
softmax and sigmoid attach to their output.

Keras keeps both as attributes of the tensor, so a new tensor made from
pieces (a concatenation, the output of a `tf.cond`) loses them. Micro-batches
carry them across: the loss then masks padded steps and starts from the
logits, as on one device.
"""

from __future__ import annotations

import tensorflow as tf

from keras_parallel._tf_internal import (
    get_keras_mask,
    keras_logits,
    set_keras_logits,
    set_keras_mask,
)

_KINDS = ((get_keras_mask, set_keras_mask), (keras_logits, set_keras_logits))


def metadata(tensor) -> list:
    """The mask and the logits on `tensor`, each a tensor or None."""
    if not isinstance(tensor, tf.Tensor):
        return [None] * len(_KINDS)
    return [get(tensor) for get, _ in _KINDS]


def attach(tensor, values: list) -> None:
    """Sets the mask and logits `values` (as `metadata` gives them; None
    leaves one unset) on `tensor`."""
    for (_, put), value in zip(_KINDS, values, strict=True):
        if value is not None:
            put(tensor, value)
