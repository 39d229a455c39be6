"""`ShardedVariable`: one value held in shards, a shard per replica's copy.

A mirrored variable whose copies hold different shards of one whole. Inside
`strategy.run` (and inside one copy's update) a replica sees its shard;
outside, reads give the whole (the shards joined) and a whole value assigned
gives each copy its shard, so `get_weights`, `set_weights`, saving and loading
see what one device would. MeshParallel cuts weights along an axis over its
model axis (`mesh.shards.AxisShards`); DataParallel cuts optimizer state by
rows over its replicas (`data_parallel.element_shards.RowShards`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import (
    Mirrored,
    MirroredVariable,
    create_mirrored_variable,
    enter_or_assert_strategy,
    get_update_replica_id,
)


class ShardedVariable(MirroredVariable):
    """Copies holding shards of a whole of shape `full_shape`.

    Subclasses say how shards join (`join`) and which shard of a whole a copy
    holds (`shard_of`); `make_sharded_variable` sets `full_shape`.
    """

    full_shape: tf.TensorShape

    def join(self, shards: Sequence[tf.Tensor]) -> tf.Tensor:
        """The whole value from the copies' shards, in replica order."""
        raise NotImplementedError

    def shard_of(self, value: tf.Tensor, replica: int) -> tf.Tensor:
        """Replica `replica`'s shard of a whole value."""
        raise NotImplementedError

    def _in_shard(self) -> bool:
        # Inside a replica (or one copy's update) the variable is its shard.
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.strategy is self.distribute_strategy:
            return True
        return get_update_replica_id() is not None

    @property
    def shape(self) -> tf.TensorShape:
        return super().shape if self._in_shard() else self.full_shape

    def get_shape(self) -> tf.TensorShape:
        return self.shape

    def __array__(self, dtype=None, copy=None):
        # NumPy (and Keras' saving) would otherwise read the first copy.
        return np.asarray(self.numpy(), dtype=dtype)

    def _get_cross_replica(self):
        return self.join([v.read_value() for v in self.values])

    def _whole_here(self) -> bool:
        # Outside replicas and outside one copy's update: the whole value.
        with enter_or_assert_strategy(self.distribute_strategy):
            return (
                tf.distribute.in_cross_replica_context()
                and get_update_replica_id() is None
            )

    def value(self):
        if self._whole_here():
            return self._get_cross_replica()
        return super().value()

    def _dense_var_to_tensor(self, dtype=None, name=None, as_ref=False):
        # What ops taking the variable read (MirroredVariable's own reads the
        # first copy outside the strategy's scope).
        if self._whole_here():
            return tf.convert_to_tensor(self._get_cross_replica(), dtype=dtype)
        return super()._dense_var_to_tensor(dtype=dtype, name=name, as_ref=as_ref)

    def _get_as_operand(self):
        # Arithmetic on the variable (`v + 1`) reads it as `value()` does.
        if self._whole_here():
            return self._get_cross_replica()
        return super()._get_as_operand()


class ShardedValue(Mirrored):
    """A summed gradient held in shards, one per replica (a sharded weight's,
    or a reduce-scattered one).

    The optimizer's update takes each copy's shard as it is; clipping and other
    arithmetic in cross-replica context (`clipnorm`, `global_clipnorm`, loss
    scaling) read the whole, as on one device.

    Args:
        values: One shard per replica.
        join: The whole from the shards.
    """

    def __init__(self, values, join: Callable[[Sequence[tf.Tensor]], tf.Tensor]):
        super().__init__(tuple(values))
        self._join = join

    def _get_cross_replica(self):
        return self._join(self.values)


def make_sharded_variable(
    cls: type[ShardedVariable],
    strategy: tf.distribute.Strategy,
    next_creator,
    devices: Sequence[str],
    shards: Callable[[tf.Tensor], list[tf.Tensor]],
    kwargs: dict,
) -> ShardedVariable:
    """A `cls` made from a variable creator's arguments: the initial value is
    computed once, whole, and `shards(whole)[r]` goes to the copy on
    `devices[r]`.

    Args:
        cls: The ShardedVariable subclass.
        strategy: The strategy whose scope creates it.
        next_creator: The next variable creator.
        devices: One device per replica.
        shards: Cuts the whole initial value into one shard per replica.
        kwargs: The creator's arguments (`initial_value`, `name`, ...).
    """
    made = {}

    def make_copies(**kwargs):
        initial = kwargs.pop("initial_value")
        # In the function being traced when the variable is made there (a
        # slot created in the first step): its initializer must be ops that
        # tf.function can lift out, not a captured eager tensor.
        with tf.device(devices[0]):
            whole = tf.convert_to_tensor(
                initial() if callable(initial) else initial, dtype=kwargs.get("dtype")
            )
            cut = shards(whole)
        copies = []
        for replica, device in enumerate(devices):
            with tf.device(device):
                named = dict(kwargs)
                if replica:
                    first = copies[0].name.split(":")[0]
                    named["name"] = f"{first}/replica_{replica}/"
                copies.append(
                    next_creator(initial_value=tf.identity(cut[replica]), **named)
                )
        made["shape"] = whole.shape
        return copies

    kwargs = dict(kwargs)
    kwargs.pop("colocate_with", None)
    kwargs.pop("shape", None)  # each copy takes its shard's shape
    variable = create_mirrored_variable(
        strategy,
        make_copies,
        {tf.VariableSynchronization.ON_WRITE: cls, "VariableClass": cls},
        kwargs,
    )
    variable.full_shape = made["shape"]
    return variable
