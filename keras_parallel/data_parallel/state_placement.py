"""`StatePlacement`: where DataParallel's variables live and how their
updates run (mirrored, split by rows, or on an owner device)."""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from keras_parallel._tf_internal import (
    DistributedVariable,
    MirroredVariable,
    SyncOnReadVariable,
    UpdateContext,
    get_update_replica_id,
    keras_scope,
    select_replica,
    update_regroup,
)
from keras_parallel.data_parallel.element_shards import (
    create_row_shards,
    splits_by_elements,
    update_part,
)
from keras_parallel.data_parallel.local_accumulation import is_accumulator
from keras_parallel.data_parallel.parameter_shards import (
    GatheredRows,
    require_elementwise,
    splits,
)
from keras_parallel.scope_errors import made_outside
from keras_parallel.sharded_variable import ShardedVariable


class StatePlacement:
    """Variable creation and updates of `ReplicaFeatures` (which sets the
    state they read in `_init_features`): by `sharding`, optimizer state
    split by rows over the devices (`element_shards`), weights too
    (`parameter_shards`), or other optimizers' state on an owner device.
    """

    def _warn_unreduced_update(self, var) -> None:
        if self._warned_unreduced_update:
            return
        self._warned_unreduced_update = True
        tf.get_logger().warning(
            "DataParallel: the trainable variable %r is updated from inside "
            "`strategy.run` by code other than an optimizer made in the "
            "strategy's scope (a manual assign, or an optimizer made before "
            "the scope), so it works on each replica's part of the batch, as "
            "under MirroredStrategy. An optimizer made in the scope clips, "
            "accumulates and averages the whole batch's gradient, as on one "
            "device: create it inside `with strategy.scope():`.",
            var.name,
        )

    def colocate_vars_with(self, colocate_with_variable):
        # Keras' optimizer builds its slots through this scope of the strategy
        # it was made in; a weight made outside that strategy's scope would
        # otherwise fail with "Need to be inside strategy.scope()".
        if isinstance(colocate_with_variable, tf.Variable):
            require_distributed(colocate_with_variable)
        return super().colocate_vars_with(colocate_with_variable)

    def _create_variable(self, next_creator, **kwargs):
        # Every optimizer making its variables in the scope (its iteration
        # counter, at construction) is known, however the step reaches it.
        caller = keras_scope()[1]
        if isinstance(caller, keras.optimizers.Optimizer):
            self._optimizers.add(caller)
        colocate_with = kwargs.get("colocate_with")
        if isinstance(colocate_with, GatheredRows):
            # State of a split weight (slots, averages): split as it is.
            require_elementwise(keras_scope()[1])
            return create_row_shards(
                self._container_strategy(), next_creator, self._devices, kwargs
            )
        if is_accumulator(kwargs) and self._averaging is None:
            return self._local_accumulators.create(
                lambda **kw: super(StatePlacement, self)._create_variable(
                    next_creator, **kw
                ),
                kwargs,
            )
        if self._sharding == "parameters" and colocate_with is None and splits(kwargs):
            return create_row_shards(
                self._container_strategy(),
                next_creator,
                self._devices,
                kwargs,
                GatheredRows,
            )
        if (
            self._sharding is not None
            and isinstance(colocate_with, MirroredVariable)
            and not isinstance(colocate_with, ShardedVariable)
        ):
            if splits_by_elements(keras_scope()[1]):
                # A slot of an elementwise optimizer: split evenly by elements.
                self._weight_parts.add(colocate_with)
                return create_row_shards(
                    self._container_strategy(), next_creator, self._devices, kwargs
                )
            # Another optimizer's slot: one copy, on the owner of its variable.
            kwargs.pop("colocate_with")
            device = colocate_with.values[self._owners.owner(colocate_with)].device
            with tf.device(device):
                return next_creator(**kwargs)
        variable = super()._create_variable(next_creator, **kwargs)
        if isinstance(variable, MirroredVariable):
            self._owners.assign(variable)
        return variable

    def _update(self, var, fn, args, kwargs, group):
        if self._averaging is not None:
            return self._update_averaged(var, fn, args, kwargs, group)
        if (
            self._tracing_step
            and not self._applying_once
            and getattr(var, "trainable", False)
        ):
            self._warn_unreduced_update(var)
        if self._applying_once and not isinstance(var, DistributedVariable):
            # Optimizer state on its variable's owner (accumulators, moving
            # averages): updated where it lives, once.
            with tf.device(var.device), UpdateContext(var.device):
                return fn(var, *args, **kwargs)
        require_distributed(var)
        if self._applying_once and isinstance(var, SyncOnReadVariable):
            # A local gradient accumulator: its value is the sum of its copies
            # (on all workers) and this update's value is the whole batch's,
            # so one copy takes it: the first replica's.
            if self._get_replica_id_in_sync_group(0) != 0:
                return tf.no_op()
            copy = var.values[0]
            with tf.device(copy.device), UpdateContext(0):
                return fn(copy, *args, **kwargs)
        if isinstance(var, ShardedVariable):
            return update_regroup(
                self, self._update_parts(var, fn, args, kwargs), group
            )
        if self._weight_parts.of(var) is not None:
            results = self._weight_parts.update(
                var,
                fn,
                args,
                kwargs,
                select_replica,
                UpdateContext,
                self._gradient_reduction.all_gather_rows,
            )
            return update_regroup(self, results, group)
        if not (self._sharding is not None and isinstance(var, MirroredVariable)):
            return super()._update(var, fn, args, kwargs, group)
        owner = self._owners.owner(var)
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
        return update_regroup(self, updates, group)

    def _update_averaged(self, var, fn, args, kwargs, group):
        """`sync_every` > 1: a replica's own optimizer step updates its own
        copy; a write from outside a step becomes every copy's, and the
        replicas' working and synchronized values (`periodic_averaging`)."""
        replica = get_update_replica_id()
        if isinstance(replica, int) and isinstance(var, DistributedVariable):
            copy = var.values[replica]
            with tf.device(copy.device):
                return fn(copy, *args, **kwargs)
        result = super()._update(var, fn, args, kwargs, group)
        if not self._tracing_step:
            self._averaging.after_outside_write(var)
        return result

    def _update_parts(self, var, fn, args, kwargs) -> list:
        """`fn` on each copy of a split variable, with whole values among its
        arguments (an assigned weight, a clipped gradient) cut to the copy's
        part and the parts of split values (state, gradients) as they are."""
        shape = var.full_shape
        results = []
        for i, copy in enumerate(var.values):
            with tf.device(copy.device), UpdateContext(i), tf.name_scope(f"update_{i}"):
                results.append(
                    update_part(
                        fn,
                        copy,
                        select_replica(i, args),
                        select_replica(i, kwargs),
                        shape,
                        functools.partial(var.shard_of, replica=i),
                    )
                )
        return results


def require_distributed(variable) -> None:
    """Raises, with the fix, for a variable made outside the scope."""
    if not isinstance(variable, DistributedVariable):
        raise ValueError(made_outside(variable, "DataParallel"))
