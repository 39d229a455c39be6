"""Optimizer state split evenly over the replicas (ZeRO stage 1).

Each slot of a mirrored weight (Adam's moments, SGD's momentum, the EMA
average) is a `RowShards`: cut along its first axis into N parts of equal row
counts, part r on replica r's device, so one large weight (an embedding
table) spreads its state over every device (Rajbhandari et al., 2020,
partition flat elements; rows keep sparse gradients sparse, so an optimizer's
sparse update adds repeated rows as it does on one device).
The weight's update then runs once per replica on its part: `WeightParts`
keeps, per weight, a variable on each device holding that replica's part of
the weight, which the optimizer's own update code updates in the weight's
place; the updated parts are joined into every copy of the weight.

Only optimizers whose update is elementwise are split so (`ELEMENTWISE`);
others (LAMB's and Adafactor's whole-variable norms, Muon's matrices, a
user's own) keep each variable's state whole on one owner device.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from keras_parallel._tf_internal import local_variable, update_as
from keras_parallel.split_variable import SplitVariable, make_split_variable

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
    return type(optimizer) in ELEMENTWISE


class RowShards(SplitVariable):
    """Copy r holds rows [r * k, (r + 1) * k) of the whole (its first axis;
    a scalar is one row), the last ones zero-padded to N * k rows."""

    def join(self, parts):
        rows = _rows(self.full_shape)
        return tf.reshape(tf.concat(parts, axis=0)[:rows], self.full_shape)

    def part_of(self, value, replica: int):
        return row_parts(value, len(self.values))[replica]


def _rows(shape: tf.TensorShape) -> int:
    return shape[0] if shape.rank else 1


def row_parts(value, num_parts: int) -> list:
    """`value` (a tensor, or a sparse gradient) cut along its first axis into
    `num_parts` parts of equal row counts; a sparse gradient stays sparse,
    its rows re-indexed within each part (so an optimizer's sparse update
    adds repeated rows as on one device)."""
    if isinstance(value, tf.IndexedSlices):
        shape = tf.TensorShape(tf.get_static_value(value.dense_shape))
        size = -(-shape[0] // num_parts)
        parts = []
        for r in range(num_parts):
            local = value.indices - r * size
            held = tf.logical_and(local >= 0, local < size)
            parts.append(
                tf.IndexedSlices(
                    tf.boolean_mask(value.values, held),
                    tf.boolean_mask(local, held),
                    tf.constant([size, *shape[1:]], value.dense_shape.dtype),
                )
            )
        return parts
    value = tf.convert_to_tensor(value)
    if not value.shape.rank:
        value = tf.reshape(value, [1])
    rows = value.shape[0]
    size = -(-rows // num_parts)
    padding = [[0, size * num_parts - rows]] + [[0, 0]] * (value.shape.rank - 1)
    padded = tf.pad(value, padding)
    return [padded[r * size : (r + 1) * size] for r in range(num_parts)]


def create_row_shards(strategy, next_creator, devices, kwargs) -> RowShards:
    """A `RowShards` made from a variable creator's arguments."""
    return make_split_variable(
        RowShards,
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


class WeightParts:
    """Per mirrored weight whose state is split by elements, one variable per
    replica device holding that replica's part of the weight."""

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

    def update(self, weight, fn, args, kwargs, select, context):
        """Runs `fn` (an update of `weight`) on each replica's part, then
        joins the parts into every copy of the weight.

        Args:
            select: `select(replica, structure)`, a replica's values.
            context: `context(replica)`, the update context of a replica.

        Returns:
            One result per copy (the copies' assignments).
        """
        parts = self.of(weight)
        shape = weight.values[0].shape
        rows = _rows(shape)
        new = []
        for replica, (copy, part) in enumerate(zip(weight.values, parts, strict=True)):
            with tf.device(copy.device), context(replica):
                part.assign(row_parts(copy.read_value(), len(parts))[replica])

                def cut(value, replica=replica):
                    if is_whole(value, shape):
                        return row_parts(value, len(parts))[replica]
                    return value

                fn(
                    part,
                    *tf.nest.map_structure(cut, select(replica, args)),
                    **tf.nest.map_structure(cut, select(replica, kwargs)),
                )
                new.append(part.read_value())
        results = []
        for copy in weight.values:
            with tf.device(copy.device):
                joined = tf.concat(new, axis=0)[:rows]
                results.append(copy.assign(tf.reshape(joined, shape)))
        return results
