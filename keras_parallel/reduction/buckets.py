"""Fusing many gradients into few flat buckets, and cutting them apart again.

Reducing 80 small tensors costs 80 reductions, each with its own launch and
synchronisation; the same bytes in one or two buckets cost one or two
(Horovod's tensor fusion, PyTorch DDP's gradient buckets).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def plan(tensors: Sequence[tf.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Groups consecutive tensors of one dtype into buckets of at most
    `bucket_bytes` (a larger tensor gets a bucket of its own).

    Args:
        tensors: One replica's tensors, with static shapes.
        bucket_bytes: Bucket capacity in bytes.

    Returns:
        Lists of indices into `tensors`, in order.
    """
    buckets: list[list[int]] = []
    size = 0
    for i, tensor in enumerate(tensors):
        nbytes = tensor.shape.num_elements() * tensor.dtype.size
        same_dtype = buckets and tensors[buckets[-1][-1]].dtype == tensor.dtype
        if same_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def pack(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Flattens and concatenates tensors (on the current device)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unpack(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Cuts `flat` back into tensors shaped like `like`."""
    sizes = [t.shape.num_elements() for t in like]
    return [
        tf.reshape(piece, t.shape)
        for piece, t in zip(tf.split(flat, sizes), like, strict=True)
    ]
