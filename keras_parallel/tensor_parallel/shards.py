"""Tensor-parallel shards: a weight cut along one axis into equal shards.

`Sharding` says how a weight is cut and joined; both tensor-parallel forms
use it. The layers of `keras_parallel.layers` hold one Keras variable per
shard, each on its device. Under MeshParallel a weight is one `AxisShards`,
the `ShardedVariable` whose copy on replica (b, m) is shard m: inside
`strategy.run` a replica reads its own shard, so a plain Keras layer computes
with its shard by itself and the tape gives each replica its shard's
gradient; outside, the weight reads whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from keras_parallel.sharded_variable import ShardedVariable, make_sharded_variable


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a weight is cut: along `axis` into `num_shards` equal shards."""

    axis: int
    num_shards: int

    def cut(self, whole) -> list[tf.Tensor]:
        """The shards of a whole value, in order."""
        return tf.split(whole, self.num_shards, axis=self.axis)

    def join(self, shards: Sequence) -> tf.Tensor:
        """The whole value from its `num_shards` shards, in order."""
        return tf.concat(list(shards), axis=self.axis)


class AxisShards(ShardedVariable):
    """A variable of a B x M mesh whose copy on replica r is shard r % M.

    Made by `create_axis_shards`, which sets `sharding`.
    """

    sharding: Sharding

    def join(self, shards):
        # The first model group's copies hold every shard once.
        return self.sharding.join(shards[: self.sharding.num_shards])

    def shard_of(self, value, replica: int):
        return self.sharding.cut(value)[replica % self.sharding.num_shards]


def create_axis_shards(
    strategy: tf.distribute.Strategy,
    next_creator,
    devices: Sequence[str],
    sharding: Sharding,
    shard_index: Callable[[int], int],
    kwargs: dict,
) -> AxisShards:
    """An `AxisShards` made from a variable creator's arguments: the initial
    value is computed once, whole, and cut into shards.

    Args:
        strategy: The strategy whose scope creates it.
        next_creator: The next variable creator.
        devices: One device per replica.
        sharding: How the weight is cut.
        shard_index: Replica -> the index of the shard its copy holds.
        kwargs: The creator's arguments (`initial_value`, `name`, ...).
    """

    def shards(whole):
        cut = sharding.cut(whole)
        return [cut[shard_index(r)] for r in range(len(devices))]

    variable = make_sharded_variable(
        AxisShards, strategy, next_creator, devices, shards, kwargs
    )
    variable.sharding = sharding
    return variable
