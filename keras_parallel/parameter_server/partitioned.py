"""Weights split by rows across ps tasks (`variable_partitioner`).

TensorFlow's ParameterServerStrategy makes a partitioned variable a
`ShardedVariable`, which Keras 3 cannot train: its step asks the gradient tape
for the gradient of each weight's one `handle`. Here a partitioned weight is
one variable, `PartitionedVariable`, whose row ranges are shared variables on
ps tasks (its shards) and whose own handle is a local resource that never
holds a value: it names the weight on the tape. Each read of the shards
records an operation from that handle, so the tape gives one gradient per
weight, as for any other:

- a whole read joins the shards on the reader's device (a Dense kernel);
- `sparse_read` gathers each id's row on the ps task that holds it, so an
  Embedding (`PartitionedLookup`) moves only the rows of its batch, and its
  gradient is those rows (`tf.IndexedSlices`);
- `update_by_shard` runs an optimizer update once per shard, on that shard's
  ps task, with that shard's rows of the gradient; meanwhile every partitioned
  variable (the optimizer's slots are partitioned alike) is that shard
  (`shard_scope`), so Adam's arithmetic runs where its rows live.

Outside a step, reads join the shards and assignments split a whole value, so
`get_weights`, `set_weights`, saving and loading see one weight.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import (
    BaseResourceVariable,
    placeholder_handle,
    record_on_tape,
    sublayers,
    variable_accessed,
)

_SCOPE = threading.local()


@contextlib.contextmanager
def shard_scope(offsets: tuple, index: int):
    """While open, every partitioned variable split at `offsets` is its
    shard `index`."""
    previous = getattr(_SCOPE, "shard", None)
    _SCOPE.shard = (tuple(offsets), index)
    try:
        yield
    finally:
        _SCOPE.shard = previous


class PartitionedVariable(BaseResourceVariable):
    """One weight whose row ranges are variables on ps tasks.

    Its assignments return the assignment (None when eager), never the new
    value, which would read every row range back.

    Args:
        shards: the row ranges, in order (variables on ps devices).
        local_device: where the weight's own handle lives (this worker).
        name, trainable, synchronization, aggregation, distribute_strategy:
            as for `tf.Variable`.
        unique_id: the same on every worker.
    """

    def __init__(
        self,
        shards: list,
        *,
        local_device: str,
        name: str,
        unique_id: str,
        trainable: bool = True,
        synchronization=tf.VariableSynchronization.AUTO,
        aggregation=tf.VariableAggregation.NONE,
        distribute_strategy=None,
    ):
        self.shards = list(shards)
        sizes = [int(part.shape[0]) for part in self.shards]
        self.offsets = (0, *np.cumsum(sizes).tolist())
        self.full_shape = tf.TensorShape([self.offsets[-1]]).concatenate(
            self.shards[0].shape[1:]
        )
        dtype = self.shards[0].dtype
        super().__init__(
            trainable=trainable,
            shape=self.full_shape,
            dtype=dtype,
            handle=placeholder_handle(self.full_shape, dtype, local_device, name),
            name=name,
            unique_id=unique_id,
            handle_name=name,
            synchronization=synchronization,
            aggregation=aggregation,
            distribute_strategy=distribute_strategy,
            in_graph_mode=False,
        )

    def current_shard(self):
        """The shard this variable is inside `shard_scope`, else None."""
        scope = getattr(_SCOPE, "shard", None)
        if scope is None:
            return None
        offsets, index = scope
        if offsets != self.offsets:
            raise ValueError(
                f"Variable {self.name!r} is split into rows at {self.offsets}, "
                f"but it is used in the update of a variable split at "
                f"{offsets}. An optimizer may only use variables partitioned "
                "like the one it updates (its own slots)."
            )
        return self.shards[index]

    @property
    def shape(self) -> tf.TensorShape:
        shard = self.current_shard()
        return self.full_shape if shard is None else shard.shape

    def _read_variable_op(self, no_copy=False):
        shard = self.current_shard()
        if shard is not None:
            return shard.value()
        variable_accessed(self)
        parts = []
        for part in self.shards:
            with tf.device(part.device):
                parts.append(
                    tf.raw_ops.ReadVariableOp(resource=part.handle, dtype=self.dtype)
                )
        whole = tf.concat(parts, axis=0)
        record_on_tape("ReadPartitionedVariable", whole, self.handle, lambda dy: dy)
        return whole

    def sparse_read(self, indices, name=None):
        """The rows `indices` (any shape), each gathered on its shard's ps
        task; the gradient is those rows."""
        shard = self.current_shard()
        if shard is not None:
            return shard.sparse_read(indices, name=name)
        variable_accessed(self)
        indices = tf.convert_to_tensor(indices)
        ids = tf.reshape(indices, [-1])
        starts = tf.constant(self.offsets[:-1], ids.dtype)
        owner = tf.searchsorted(starts, ids, side="right") - 1
        # Ids outside the table go to the last shard, whose gather rejects
        # them as one device's would.
        owner = tf.clip_by_value(owner, 0, len(self.shards) - 1)
        local = ids - tf.gather(starts, owner)
        owner = tf.cast(owner, tf.int32)
        count = len(self.shards)
        local_ids = tf.dynamic_partition(local, owner, count)
        positions = tf.dynamic_partition(tf.range(tf.size(ids)), owner, count)
        rows = []
        for part, part_ids in zip(self.shards, local_ids, strict=True):
            with tf.device(part.device):
                rows.append(
                    tf.raw_ops.ResourceGather(
                        resource=part.handle, indices=part_ids, dtype=self.dtype
                    )
                )
        row_shape = self.full_shape[1:]
        flat = tf.ensure_shape(tf.dynamic_stitch(positions, rows), [None, *row_shape])
        result = tf.reshape(
            flat, tf.concat([tf.shape(indices), row_shape.as_list()], axis=0)
        )
        dense_shape = tf.constant(self.full_shape.as_list(), tf.int64)

        def backward(dy):
            values = tf.reshape(dy, [-1, *row_shape])
            return tf.IndexedSlices(values, ids, dense_shape)

        record_on_tape("GatherPartitionedVariable", result, self.handle, backward)
        return result

    def is_initialized(self, name=None):
        return tf.reduce_all([part.is_initialized() for part in self.shards])

    def _each_shard(self, method: str, value, *args, **kwargs):
        shard = self.current_shard()
        if shard is not None:
            return getattr(shard, method)(value, *args, **kwargs)
        if not isinstance(value, tf.IndexedSlices):
            # A restored checkpoint's tensor has no static shape.
            value = tf.ensure_shape(
                tf.convert_to_tensor(value, dtype=self.dtype), self.full_shape
            )
        done = [
            getattr(part, method)(piece, *args, **kwargs)
            for part, piece in zip(self.shards, self.pieces(value), strict=True)
        ]
        return None if tf.executing_eagerly() else tf.group(done)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        return self._each_shard("assign", value, read_value=False)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        return self._each_shard("assign_add", delta, read_value=False)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        return self._each_shard("assign_sub", delta, read_value=False)

    def scatter_update(self, sparse_delta, use_locking=False, name=None):
        return self._each_shard("scatter_update", sparse_delta)

    def scatter_add(self, sparse_delta, use_locking=False, name=None):
        return self._each_shard("scatter_add", sparse_delta)

    def scatter_sub(self, sparse_delta, use_locking=False, name=None):
        return self._each_shard("scatter_sub", sparse_delta)

    def _restore_from_tensors(self, restored_tensors):
        (value,) = restored_tensors.values()
        self.assign(value)
        return self

    def pieces(self, value) -> list:
        """`value` as each shard's part: the rows of a tensor or of a
        `tf.IndexedSlices` of this variable's shape (renumbered from the
        shard's first row); anything else is the same for every shard."""
        if isinstance(value, tf.IndexedSlices):
            return [self._rows_of_slices(value, k) for k in range(len(self.shards))]
        if (
            isinstance(value, tf.Tensor)
            and value.shape.rank == self.full_shape.rank
            and value.shape.is_compatible_with(self.full_shape)
        ):
            return [
                value[start:stop]
                for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True)
            ]
        return [value] * len(self.shards)

    def _rows_of_slices(self, slices: tf.IndexedSlices, index: int):
        start, stop = self.offsets[index], self.offsets[index + 1]
        indices = slices.indices
        inside = (indices >= start) & (indices < stop)
        dense_shape = tf.concat(
            [
                tf.constant([stop - start], tf.int64),
                tf.cast(self.full_shape[1:].as_list(), tf.int64),
            ],
            axis=0,
        )
        return tf.IndexedSlices(
            tf.boolean_mask(slices.values, inside),
            tf.boolean_mask(indices, inside) - tf.cast(start, indices.dtype),
            tf.cast(dense_shape, indices.dtype),
        )


def update_by_shard(var: PartitionedVariable, fn, args, kwargs) -> list:
    """`fn(var, *args, **kwargs)` once per shard, on the shard's ps task,
    with the shard's rows of the whole-weight arguments (the gradient), cut
    here so that each ps task receives its rows only."""
    results = []
    pieces = [var.pieces(arg) for arg in args]
    for index, part in enumerate(var.shards):
        shard_args = [piece[index] for piece in pieces]
        with shard_scope(var.offsets, index), tf.device(part.device):
            results.append(fn(var, *shard_args, **kwargs))
    return results


class PartitionedLookup:
    """An Embedding whose table is a `PartitionedVariable` gathers each id's
    row on the ps task holding it, instead of reading the whole table."""

    def call(self, inputs):
        table = getattr(self.embeddings, "value", None)
        if (
            not isinstance(table, PartitionedVariable)
            or not isinstance(inputs, tf.Tensor)
            or self.lora_enabled
            or self.quantization_mode is not None
        ):
            return super().call(inputs)
        if inputs.dtype not in (tf.int32, tf.int64):
            inputs = tf.cast(inputs, tf.int32)
        # Negative ids count from the end, as Keras' `take` has them.
        rows = tf.cast(table.full_shape[0], inputs.dtype)
        inputs = tf.where(inputs < 0, inputs + rows, inputs)
        return keras.ops.cast(table.sparse_read(inputs), self.compute_dtype)


def partitioned_lookups(models) -> list:
    """The Embedding layers of `models` whose table is partitioned and whose
    `call` is Keras' own (a subclass's own `call` is left alone)."""
    found = []
    for model in models:
        for layer in sublayers(model):
            if (
                isinstance(layer, keras.layers.Embedding)
                and type(layer).call is keras.layers.Embedding.call
                and layer.built
                and isinstance(
                    getattr(layer.embeddings, "value", None), PartitionedVariable
                )
            ):
                found.append(layer)
    return found
