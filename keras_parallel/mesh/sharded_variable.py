"""`ShardedVariable`: one weight split over a mesh's model axis.

A mirrored variable whose copy on replica (b, m) is shard m. Inside
`strategy.run` a replica reads its own shard, so a plain Keras layer computes
its part of the output by itself and the tape gives each replica its shard's
gradient. Outside, reads give the whole weight (the shards joined) and
assignments of a whole weight give each copy its shard, so `get_weights`,
`set_weights`, saving and loading see what one device would.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import (
    Mirrored,
    MirroredVariable,
    create_mirrored_variable,
    enter_or_assert_strategy,
    get_update_replica_id,
)
from keras_parallel.mesh.layout import Mesh, Sharding


class ShardedVariable(MirroredVariable):
    """A variable of a B x M mesh whose copy on replica r is shard r % M.

    Made by `create_sharded`; `sharding` and `full_shape` are set there.
    """

    sharding: Sharding
    full_shape: tf.TensorShape

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

    def shard_of(self, value, replica: int):
        """Replica `replica`'s shard of `value`, a whole-weight tensor."""
        pieces = self.sharding.num_shards
        return tf.split(value, pieces, axis=self.sharding.axis)[replica % pieces]

    def __array__(self, dtype=None, copy=None):
        # NumPy (and Keras' saving) would otherwise read the first copy.
        return np.asarray(self.numpy(), dtype=dtype)

    def _get_cross_replica(self):
        # The shards of the first model group, joined.
        shards = [v.read_value() for v in self.values[: self.sharding.num_shards]]
        return tf.concat(shards, axis=self.sharding.axis)

    def _whole_here(self) -> bool:
        # Outside replicas and outside one copy's update: the whole weight.
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
    """A split weight's gradient, summed: copy r is shard r % M of it.

    The optimizer's update takes each copy to its shard; clipping and other
    arithmetic in cross-replica context (`clipnorm`, `global_clipnorm`) read
    the whole gradient, as on one device.
    """

    def __init__(self, values, sharding: Sharding):
        super().__init__(tuple(values))
        self.sharding = sharding

    def _get_cross_replica(self):
        shards = self.values[: self.sharding.num_shards]
        return tf.concat(shards, axis=self.sharding.axis)


def create_sharded(
    strategy: tf.distribute.Strategy,
    next_creator,
    mesh: Mesh,
    sharding: Sharding,
    kwargs: dict,
) -> ShardedVariable:
    """A `ShardedVariable` made from a variable creator's arguments: the
    initial value is computed once, whole, and cut into shards.

    Args:
        strategy: The strategy whose scope creates it.
        next_creator: The next variable creator.
        mesh: The mesh; replica r gets shard `mesh.model_index(r)`.
        sharding: Axis and number of shards.
        kwargs: The creator's arguments (`initial_value`, `name`, ...).
    """

    def make_shards(**kwargs):
        initial = kwargs.pop("initial_value")
        with tf.init_scope(), tf.device(mesh.devices[0]):
            whole = tf.convert_to_tensor(
                initial() if callable(initial) else initial,
                dtype=kwargs.get("dtype"),
            )
            pieces = tf.split(whole, sharding.num_shards, axis=sharding.axis)
        components = []
        for replica, device in enumerate(mesh.devices):
            with tf.device(device):
                named = dict(kwargs)
                if replica:
                    first = components[0].name.split(":")[0]
                    named["name"] = f"{first}/replica_{replica}/"
                components.append(
                    next_creator(
                        initial_value=tf.identity(pieces[mesh.model_index(replica)]),
                        **named,
                    )
                )
        make_shards.whole_shape = whole.shape
        return components

    kwargs = dict(kwargs)
    kwargs.pop("colocate_with", None)
    kwargs.pop("shape", None)  # each copy takes its shard's shape
    variable = create_mirrored_variable(
        strategy,
        make_shards,
        {
            tf.VariableSynchronization.ON_WRITE: ShardedVariable,
            "VariableClass": ShardedVariable,
        },
        kwargs,
    )
    variable.sharding = sharding
    variable.full_shape = make_shards.whole_shape
    return variable
