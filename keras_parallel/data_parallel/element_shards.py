"""Optimizer state split evenly over the replicas (ZeRO stage 1).

Each slot of a mirrored weight (Adam's moments, SGD's momentum, the EMA
average) is a `RowShards`: cut along its first axis into N shards of equal
row counts, shard r on replica r's device, so one large weight (an embedding
table) spreads its state over every device (Rajbhandari et al., 2020,
partition flat elements; rows keep sparse gradients sparse, so an optimizer's
sparse update adds repeated rows as it does on one device).
The weight's update then runs once per replica on its shard: `WeightShards`
keeps, per weight, a variable on each device holding that replica's shard of
the weight, which the optimizer's own update code updates in the weight's
place; the updated shards are joined into every copy of the weight.

Only optimizers whose update is elementwise are split so (`ELEMENTWISE`);
others (LAMB's and Adafactor's whole-variable norms, Muon's matrices, a
user's own) keep each variable's state whole on one owner device.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from keras_parallel._tf_internal import local_variable, update_as
from keras_parallel.reduction.rows import join_rows, row_part, row_parts
from keras_parallel.sharded_variable import ShardedVariable, make_sharded_variable
from keras_parallel.specialize import own_class

ELEMENTWISE = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Adamax,
    keras.optimizers.Adagrad,
    keras.optimizers.Adadelta,
    keras.optimizers.RMSprop,
    keras.optimizers.Nadam,
    keras.optimizers.Lion,
    keras.optimizers.Ftrl,
)


def splits_by_elements(optimizer) -> bool:
    """Whether `optimizer`'s state can be split by elements (its class is
    one of Keras' elementwise optimizers, not a subclass)."""
    return own_class(optimizer) in ELEMENTWISE


class RowShards(ShardedVariable):
    """Copy r holds rows [r * k, (r + 1) * k) of the whole (its first axis;
    a scalar is one row), the last ones zero-padded to N * k rows."""

    def join(self, parts):
        return join_rows(parts, self.full_shape)

    def shard_of(self, value, replica: int):
        return row_part(value, len(self.values), replica)


def create_row_shards(
    strategy, next_creator, devices, kwargs, cls: type[RowShards] = RowShards
) -> RowShards:
    """A `cls` (a `RowShards`) made from a variable creator's arguments."""
    return make_sharded_variable(
        cls,
        strategy,
        next_creator,
        devices,
        lambda whole: row_parts(whole, len(devices)),
        kwargs,
    )


def is_whole(value, shape: tf.TensorShape) -> bool:
    """Whether `value` is a whole value of a variable of `shape` (a tensor,
    a variable, or a sparse gradient)."""
    if isinstance(value, tf.IndexedSlices):
        return tf.TensorShape(tf.get_static_value(value.dense_shape)) == shape
    return isinstance(value, (tf.Tensor, tf.Variable)) and value.shape == shape


def update_shard(fn, shard, args, kwargs, shape: tf.TensorShape, shard_of):
    """`fn(shard, *args, **kwargs)`, with the whole values of a variable of
    `shape` among the arguments (an assigned weight, a clipped gradient) cut
    to the shard by `shard_of(value)`; shards (state, split gradients) pass as
    they are."""

    def cut(value):
        return shard_of(value) if is_whole(value, shape) else value

    return fn(
        shard, *tf.nest.map_structure(cut, args), **tf.nest.map_structure(cut, kwargs)
    )


class WeightShards:
    """Per mirrored weight whose state is split by elements, one variable per
    replica device holding that replica's shard of the weight."""

    def __init__(self):
        # id -> (the weight, weakly; its parts): an id a collected weight
        # leaves behind may come back for another (a notebook's new model).
        self._parts: dict[int, tuple[weakref.ref, list[tf.Variable]]] = {}

    def add(self, weight) -> None:
        """Makes `weight`'s parts (once)."""
        if self.of(weight) is not None:
            return
        parts = []
        with tf.init_scope():
            pieces = row_parts(weight.values[0].read_value(), len(weight.values))
            for copy, piece in zip(weight.values, pieces, strict=True):
                with tf.device(copy.device):
                    part = local_variable(piece, weight.name.split(":")[0])
                # The optimizer finds the weight's state when it updates it.
                update_as(part, weight)
                parts.append(part)
        self._parts[id(weight)] = (weakref.ref(weight), parts)

    def of(self, weight) -> list[tf.Variable] | None:
        """`weight`'s parts, or None when its state is not split."""
        known, parts = self._parts.get(id(weight), (None, None))
        return parts if known is not None and known() is weight else None

    def update(self, weight, fn, args, kwargs, select, context, gather):
        """Runs `fn` (an update of `weight`) on each replica's part, then
        gathers the parts into every copy of the weight.

        Args:
            select: `select(replica, structure)`, a replica's values.
            context: `context(replica)`, the update context of a replica.
            gather: `gather(parts, shape, label)`, the whole on each part's
                device (the reduction engine's all-gather).

        Returns:
            One result per copy (the copies' assignments).
        """
        parts = self.of(weight)
        shape = weight.values[0].shape
        new = []
        for replica, (copy, part) in enumerate(zip(weight.values, parts, strict=True)):
            with tf.device(copy.device), context(replica):
                part.assign(row_part(copy.read_value(), len(parts), replica))
                update_shard(
                    fn,
                    part,
                    select(replica, args),
                    select(replica, kwargs),
                    shape,
                    lambda value, r=replica: row_part(value, len(parts), r),
                )
                new.append(part.read_value())
        wholes = gather(new, shape, weight.name.split(":")[0])
        results = []
        for copy, whole in zip(weight.values, wholes, strict=True):
            with tf.device(copy.device):
                results.append(copy.assign(whole))
        return results
