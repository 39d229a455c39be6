"""`GradientSharded` (`sharding="gradients"`, ZeRO stage 2): the summed
gradients split over the replicas too.

The dense gradients of weights an elementwise optimizer updates in parts are
reduce-scattered, so each replica receives only the rows it updates (half
the traffic of an all-reduce); the rest take `OptimizerSharded`'s route.
"""

from __future__ import annotations

import tensorflow as tf

from keras_parallel._tf_internal import MirroredVariable
from keras_parallel.data_parallel.element_shards import splits_by_elements
from keras_parallel.data_parallel.modes.optimizer_sharded import OptimizerSharded
from keras_parallel.reduction.engine import is_dense
from keras_parallel.reduction.rows import join_rows
from keras_parallel.sharded_variable import ShardedValue, ShardedVariable


class GradientSharded(OptimizerSharded):
    """Optimizer state and summed gradients split over the replicas."""

    serves_mesh = False

    def route(self, engine, grads, variables, present, reduced, optimizer) -> list:
        scattered = self._scattered(grads, variables, present, optimizer)
        handed = super().route(
            engine, grads, variables, present, reduced + scattered, optimizer
        )
        if scattered:
            rows = engine.gradient_reduction.reduce_scatter(
                [grads[i] for i in scattered]
            )
            for i, parts in zip(scattered, rows, strict=True):
                shape = grads[i].values[0].shape
                handed[i] = ShardedValue(
                    parts, lambda parts, shape=shape: join_rows(parts, shape)
                )
        return handed

    def _scattered(self, grads, variables, present, optimizer) -> list[int]:
        """Indices of the gradients to reduce-scatter: dense ones of weights
        an elementwise optimizer updates in parts (made now when the
        optimizer has no state to split, as plain SGD)."""
        if variables is None:
            return []
        # A LossScaleOptimizer's update is its inner optimizer's.
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if not splits_by_elements(optimizer):
            return []
        scattered = []
        for i in present:
            variable = getattr(variables[i], "value", variables[i])
            if (
                isinstance(grads[i], tf.distribute.DistributedValues)
                and isinstance(variable, MirroredVariable)
                and not isinstance(variable, ShardedVariable)
                and is_dense(grads[i].values)
            ):
                self.weight_shards.add(variable)
                scattered.append(i)
        return scattered
