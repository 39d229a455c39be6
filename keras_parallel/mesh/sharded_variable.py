"""`ShardedVariable`: one weight split over a mesh's model axis.

A `SplitVariable` whose copy on replica (b, m) is shard m. Inside
`strategy.run` a replica reads its own shard, so a plain Keras layer computes
its part of the output by itself and the tape gives each replica its shard's
gradient; outside, the weight reads whole.
"""

from __future__ import annotations

import tensorflow as tf

from keras_parallel.mesh.layout import Mesh, Sharding
from keras_parallel.split_variable import SplitVariable, make_split_variable


class ShardedVariable(SplitVariable):
    """A variable of a B x M mesh whose copy on replica r is shard r % M.

    Made by `create_sharded`, which sets `sharding`.
    """

    sharding: Sharding

    def join(self, parts):
        return join_shards(parts, self.sharding)

    def part_of(self, value, replica: int):
        pieces = self.sharding.num_shards
        return tf.split(value, pieces, axis=self.sharding.axis)[replica % pieces]


def join_shards(parts, sharding: Sharding) -> tf.Tensor:
    """The whole value from per-replica shards: those of the first model
    group, joined along the split axis."""
    return tf.concat(list(parts[: sharding.num_shards]), axis=sharding.axis)


def create_sharded(
    strategy: tf.distribute.Strategy,
    next_creator,
    mesh: Mesh,
    sharding: Sharding,
    kwargs: dict,
) -> ShardedVariable:
    """A `ShardedVariable` made from a variable creator's arguments: the
    initial value is computed once, whole, and cut into shards; replica r
    gets shard `mesh.model_index(r)`."""

    def parts(whole):
        shards = tf.split(whole, sharding.num_shards, axis=sharding.axis)
        return [shards[mesh.model_index(r)] for r in range(len(mesh.devices))]

    variable = make_split_variable(
        ShardedVariable, strategy, next_creator, mesh.devices, parts, kwargs
    )
    variable.sharding = sharding
    return variable
