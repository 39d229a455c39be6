"""`OptimizerSharded` (`sharding="optimizer"`, ZeRO stage 1): the optimizer
state split over the replicas.

The slots of an elementwise optimizer (`element_shards.ELEMENTWISE`) are cut
by rows into one part per replica; each replica updates its part of every
weight with the summed gradient, and the updated parts are gathered into
every copy of the weight (`element_shards.WeightShards`). Other optimizers'
slots live whole on one owner device per weight, chosen to balance bytes
(`ownership.OwnerTable`); the owner updates its copy and the others take
its value.

Under `sharding="auto"` a weight of fewer than `AUTO_MIN_SPLIT_ELEMENTS`
takes the owner's way with every optimizer (as PyTorch's
ZeroRedundancyOptimizer places whole parameters). Split by rows, each
weight costs every device its own run of the optimizer's per-variable ops
(about 20 for Adam) plus a refresh and a gather of its part, so a model of
many small weights (a 40x64 MLP: 82) ran three times one device's ops per
step, and such a step's time follows its op count, not its elements. Owned
whole, a weight's update runs once, on one device, and the other copies
take its value (`benchmarks/overhead.py` counts the ops). The owners balance
bytes, so the state held per device exceeds 1/N of the whole by at most
one such weight's state.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel._tf_internal import (
    MirroredVariable,
    UpdateContext,
    keras_scope,
    select_replica,
    update_regroup,
)
from keras_parallel.data_parallel.element_shards import (
    WeightShards,
    create_row_shards,
    splits_by_elements,
)
from keras_parallel.data_parallel.modes.gather_warning import UncompressedGathers
from keras_parallel.data_parallel.modes.replicated import Replicated
from keras_parallel.data_parallel.ownership import OwnerTable
from keras_parallel.sharded_variable import ShardedVariable

# Weights from 2 Mi elements (8 MiB in float32) up are split by rows under
# "auto": such a weight (an embedding table) is what splitting the state is
# for, and its update's own work outweighs the ops and copies a split adds
# to every device. Below, owning whole is faster: on logical CPUs even the
# 2x1024 MLP's 1 Mi kernel (benchmarks/overhead.py); a GPU launches an op in
# ~5 us and streams ~1 TB/s, so Adam's ~20 ops per part cost about what
# halving a 1 Mi weight's update saves.
AUTO_MIN_SPLIT_ELEMENTS = 2**21


class OptimizerSharded(Replicated):
    """Optimizer state split over the replicas; weights whole on each.

    Args:
        gather_warning: Warns after the first training step that the weights
            gathered travel uncompressed (the user chose this mode with a
            compression), or None.
        min_split_elements: A weight of fewer elements keeps its state whole
            on its owner, whatever its optimizer. 0 (`sharding="optimizer"`):
            every elementwise optimizer's state is split by rows.
    """

    def __init__(
        self,
        gather_warning: UncompressedGathers | None = None,
        min_split_elements: int = 0,
    ):
        self._gather_warning = gather_warning
        self.min_split_elements = min_split_elements

    @classmethod
    def auto(cls) -> OptimizerSharded:
        """The sharding `"auto"` chooses: each weight under
        `AUTO_MIN_SPLIT_ELEMENTS` keeps its state whole on its owner."""
        return cls(min_split_elements=AUTO_MIN_SPLIT_ELEMENTS)

    def attach(self, engine) -> None:
        self.owners = OwnerTable(len(engine.devices))
        self.weight_shards = WeightShards()

    def create_other(self, engine, next_creator, kwargs):
        colocate_with = kwargs.get("colocate_with")
        if isinstance(colocate_with, MirroredVariable) and not isinstance(
            colocate_with, ShardedVariable
        ):
            if splits_by_elements(keras_scope()[1]) and not self._small(colocate_with):
                # A slot of an elementwise optimizer: split evenly by rows.
                self.weight_shards.add(colocate_with)
                return create_row_shards(
                    engine.container_strategy(), next_creator, engine.devices, kwargs
                )
            # A slot of another optimizer, or of a small weight: one copy, on
            # the owner of its variable.
            kwargs = dict(kwargs)
            kwargs.pop("colocate_with")
            with tf.device(
                colocate_with.values[self.owners.owner(colocate_with)].device
            ):
                return next_creator(**kwargs)
        variable = super().create_other(engine, next_creator, kwargs)
        if isinstance(variable, MirroredVariable) and not self._large(variable):
            # A large weight gets an owner only when its whole state needs
            # one (another optimizer's), so that the bytes of a weight split
            # by rows push no small weight off a device.
            self.owners.assign(variable)
        return variable

    def _small(self, weight) -> bool:
        """Whether `weight`'s state stays whole on its owner with any
        optimizer."""
        return weight.shape.num_elements() < self.min_split_elements

    def _large(self, weight) -> bool:
        """Whether `weight`'s state is split by rows (with an elementwise
        optimizer) because of its size."""
        return bool(self.min_split_elements) and not self._small(weight)

    @contextlib.contextmanager
    def step(self, engine, models, sizes, training):
        with super().step(engine, models, sizes, training):
            yield
        if training and self._gather_warning is not None:
            self._gather_warning.after_step(engine)

    def for_update(self, total, variable):
        # Only the owner's copy of a sum is read; a weight updated in parts
        # reads each replica's own.
        weight = getattr(variable, "value", variable)
        if (
            variable is None
            or isinstance(weight, ShardedVariable)
            or self.weight_shards.of(weight) is not None
            or not isinstance(weight, MirroredVariable)
            or not isinstance(total, tf.distribute.DistributedValues)
        ):
            # (One local replica gives a plain tensor.)
            return super().for_update(total, variable)
        return total.values[self.owners.owner(weight)]

    def update_mirrored(self, engine, var, fn, args, kwargs, group):
        if self.weight_shards.of(var) is not None:
            results = self.weight_shards.update(
                var,
                fn,
                args,
                kwargs,
                select_replica,
                UpdateContext,
                engine.gradient_reduction.all_gather_rows,
            )
            return update_regroup(engine, results, group)
        if not isinstance(var, MirroredVariable):
            return super().update_mirrored(engine, var, fn, args, kwargs, group)
        engine.gradient_reduction.count_broadcast(
            var, len(var.values), var.name.split(":")[0]
        )
        return update_regroup(
            engine, self._update_on_owner(var, fn, args, kwargs), group
        )

    def _update_on_owner(self, var, fn, args, kwargs) -> list:
        """The owner's copy updated by `fn`, the other copies assigned its new
        value (a broadcast); each copy's result."""
        owner = self.owners.owner(var)
        components = var.values
        with (
            tf.device(components[owner].device),
            UpdateContext(owner),
            tf.name_scope(f"update_{owner}"),
        ):
            result = fn(
                components[owner],
                *select_replica(owner, args),
                **select_replica(owner, kwargs),
            )
            new_value = components[owner].read_value()
        # Non-owners return what the owner's update returned (nothing, an op,
        # or the variable), so that callers see MirroredStrategy's result.
        wants_value = result is not None and not isinstance(result, tf.Operation)
        updates = []
        for i, component in enumerate(components):
            if i == owner:
                updates.append(result)
                continue
            with tf.device(component.device), tf.name_scope(f"update_{i}"):
                assign = component.assign(new_value, read_value=wants_value)
            updates.append(None if result is None else assign)
        return updates
