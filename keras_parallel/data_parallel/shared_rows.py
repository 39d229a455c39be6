"""Sparse gradients whose rows do not depend on the batch are summed row by row.

An embedding looked up at indices that do not come from the batch (a
transformer's position embedding reads `range(maxlen)`) gets, on one device,
one gradient row per index, summed over the batch. Every replica computes the
same indices with its part of that sum, and tf.distribute's reduction of
`IndexedSlices` concatenates the replicas' slices: the reduced gradient holds
each row N times. Optimizers that square sparse values before summing
duplicates (Keras' Adam, AdamW, Adagrad, RMSprop) then move those rows by
another amount than one device. Here such a gradient's values, equal in shape
on every replica, are summed like a dense tensor (through the same buckets and
compression) and keep the one set of indices.

Indices computed from the batch (a lookup of token ids) are concatenated as
before: one device's gradient holds the same occurrences, in batch order.
"""

from __future__ import annotations

import tensorflow as tf

from keras_parallel._tf_internal import PerReplica


class SharedRows:
    """A per-replica sparse gradient whose indices are the same constant on
    every replica: its values to sum, and how to rebuild the sum.

    Args:
        gradient: Per-replica `tf.IndexedSlices`.
    """

    def __init__(self, gradient):
        self._parts = gradient.values
        self.values = PerReplica(tuple(p.values for p in self._parts))

    @classmethod
    def of(cls, gradient) -> SharedRows | None:
        """A `SharedRows` for `gradient`, or None unless it is a per-replica
        sparse gradient with indices that depend on no input."""
        if not isinstance(gradient, PerReplica):
            return None
        parts = gradient.values
        if len(parts) < 2 or not all(isinstance(p, tf.IndexedSlices) for p in parts):
            return None
        if not all(p.values.shape.is_fully_defined() for p in parts):
            return None
        if not all(_constant(p.indices) for p in parts):
            return None
        return cls(gradient)

    def rebuild(self, total):
        """The summed sparse gradient from `total`, the reduced values (one
        per device, as the reduction returns them)."""
        sums = (
            total.values
            if isinstance(total, tf.distribute.DistributedValues)
            else (total,)
        )
        rebuilt = []
        for part, summed in zip(self._parts, sums, strict=True):
            rebuilt.append(tf.IndexedSlices(summed, part.indices, part.dense_shape))
        return type(total)(tuple(rebuilt)) if len(rebuilt) > 1 else rebuilt[0]


def _constant(tensor, limit: int = 64) -> bool:
    """Whether `tensor` (in a graph) is computed from constants only, by
    stateless ops: the same on every replica whatever the batch."""
    if not hasattr(tensor, "op"):
        return False
    pending, seen = [tensor.op], set()
    while pending:
        op = pending.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if len(seen) > limit or op.op_def is None or op.op_def.is_stateful:
            return False
        if not op.inputs and op.type != "Const":
            return False  # a placeholder: the function's input
        pending.extend(t.op for t in op.inputs)
    return True
