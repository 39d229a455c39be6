"""`ParameterSharded` (`sharding="parameters"`, ZeRO stage 3, PyTorch's
FSDP): the weights split over the replicas too.

Every trainable weight that can be cut by rows is a `GatheredRows`, and so
is its optimizer state (`parameter_shards.py`): a layer gathers its weights
when its call begins, their gradients are reduce-scattered in the backward
pass, and each replica updates only its part. Other weights take
`OptimizerSharded`'s way.
"""

from __future__ import annotations

import contextlib

from keras_parallel._tf_internal import keras_scope
from keras_parallel.data_parallel.element_shards import create_row_shards
from keras_parallel.data_parallel.modes.optimizer_sharded import OptimizerSharded
from keras_parallel.data_parallel.parameter_shards import (
    GatheredRows,
    require_elementwise,
    specialize_gathering,
    splits,
)
from keras_parallel.reduction.engine import local_parts
from keras_parallel.sharded_variable import ShardedValue


class ParameterSharded(OptimizerSharded):
    """Weights, gradients and optimizer state split over the replicas."""

    serves_mesh = False

    def create_variable(self, engine, next_creator, kwargs):
        colocate_with = kwargs.get("colocate_with")
        if isinstance(colocate_with, GatheredRows):
            # State of a split weight (slots, averages): split as it is.
            require_elementwise(keras_scope()[1])
            return create_row_shards(
                engine.container_strategy(), next_creator, engine.devices, kwargs
            )
        return super().create_variable(engine, next_creator, kwargs)

    def create_other(self, engine, next_creator, kwargs):
        if kwargs.get("colocate_with") is None and splits(kwargs):
            return create_row_shards(
                engine.container_strategy(),
                next_creator,
                engine.devices,
                kwargs,
                GatheredRows,
            )
        return super().create_other(engine, next_creator, kwargs)

    def reduced_in_backward(self, grads, variables, present, optimizer) -> list[int]:
        # Each replica's gradient of a split weight is already the sum of its
        # rows over all replicas.
        if variables is None:
            return []
        found = [
            i
            for i in present
            if isinstance(getattr(variables[i], "value", None), GatheredRows)
        ]
        if found:
            require_elementwise(getattr(optimizer, "inner_optimizer", optimizer))
        return found

    def route(self, engine, grads, variables, present, reduced, optimizer) -> list:
        handed = super().route(engine, grads, variables, present, reduced, optimizer)
        for i in reduced:
            handed[i] = ShardedValue(local_parts(grads[i]), variables[i].value.join)
        return handed

    @contextlib.contextmanager
    def step(self, engine, models, sizes, training):
        with (
            specialize_gathering(models),
            super().step(engine, models, sizes, training),
        ):
            yield
