"""`Replicated` (`sharding=None`): synchronous training with whole state on
every replica, the base of the sharded modes.

Every replica keeps whole weights and optimizer state. The replicas'
gradients are summed in one batched reduction, and the optimizer's own
`apply` runs once on the sums (cross-replica context), so clipping, moving
averages, weight decay and loss scaling see the whole batch's gradient, as
on one device; its update writes every copy. Keras' gradient accumulators
stay per replica and are reduced once per update (`local_accumulation.py`).
"""

from __future__ import annotations

import tensorflow as tf

from keras_parallel._tf_internal import (
    DistributedVariable,
    SyncOnReadVariable,
    UpdateContext,
    update_regroup,
)
from keras_parallel.data_parallel.local_accumulation import is_accumulator
from keras_parallel.data_parallel.modes.base import Mode
from keras_parallel.data_parallel.shared_rows import SharedRows
from keras_parallel.scope_errors import require_distributed
from keras_parallel.sharded_variable import ShardedValue, ShardedVariable


class Replicated(Mode):
    """Whole weights and optimizer state on every replica."""

    serves_mesh = True

    def create_variable(self, engine, next_creator, kwargs):
        if is_accumulator(kwargs):
            return engine.local_accumulators.create(
                lambda **kw: engine.mirrored(next_creator, kw), kwargs
            )
        return self.create_other(engine, next_creator, kwargs)

    def create_other(self, engine, next_creator, kwargs):
        """Makes a variable other than a gradient accumulator."""
        return engine.mirrored(next_creator, kwargs)

    def apply(self, engine, apply, grads, variables, optimizer):
        present = [i for i, g in enumerate(grads) if g is not None]
        if variables is not None:
            grads = [
                engine.with_static_shape(g, v)
                for g, v in zip(grads, variables, strict=True)
            ]
        reduced = self.reduced_in_backward(grads, variables, present, optimizer)
        grads = engine.loss_weights.weigh_gradients(grads, summed=reduced)
        accumulators = (
            None
            if variables is None
            else engine.local_accumulators.of(
                getattr(apply, "__self__", None), variables
            )
        )
        if accumulators is not None:
            engine.local_accumulators.add(accumulators, grads)
            # The gradient is already in the accumulators: Keras adds zero.
            handed = [
                None if g is None else tf.zeros(v.shape, v.dtype)
                for g, v in zip(grads, variables, strict=True)
            ]
            engine.steps_per_update = apply.__self__.gradient_accumulation_steps
            reading = engine.local_accumulators.reading(accumulators)
        else:
            handed = self.route(engine, grads, variables, present, reduced, optimizer)
            engine.steps_per_update = 1
            reading = None
        with engine.applying_once(reading):
            return apply(handed, variables)

    def reduced_in_backward(self, grads, variables, present, optimizer) -> list[int]:
        """Indices of gradients the backward pass already summed over the
        replicas (each replica holding its part)."""
        del grads, variables, present, optimizer
        return []

    def route(self, engine, grads, variables, present, reduced, optimizer) -> list:
        """The gradients the optimizer's `apply` receives: those of
        `present` not in `reduced` summed over the replicas (one batched
        reduction), each as `for_update` hands it."""
        del optimizer
        summed = [i for i in present if i not in reduced]
        handed = list(grads)
        for i, total in zip(
            summed, sum_gradients(engine, [grads[i] for i in summed]), strict=True
        ):
            handed[i] = self.for_update(
                total, None if variables is None else variables[i]
            )
        return handed

    def for_update(self, total, variable):
        """What the update of `variable` reads of its gradient's sum."""
        weight = getattr(variable, "value", variable)
        if isinstance(weight, ShardedVariable) and isinstance(
            total, tf.distribute.DistributedValues
        ):
            # Each copy of a split weight (MeshParallel's) takes its own
            # replica's sum; read whole elsewhere.
            return ShardedValue(total.values, weight.join)
        return total

    def update(self, engine, var, fn, args, kwargs, group):
        if engine.tracing and not engine.applying and getattr(var, "trainable", False):
            engine.warn_unreduced_update(var)
        if engine.applying and not isinstance(var, DistributedVariable):
            # Optimizer state on its variable's owner: updated where it
            # lives, once.
            with tf.device(var.device), UpdateContext(var.device):
                return fn(var, *args, **kwargs)
        require_distributed(var, "DataParallel")
        if engine.applying and isinstance(var, SyncOnReadVariable):
            # A local gradient accumulator: its value is the sum of its copies
            # (on all workers) and this update's value is the whole batch's,
            # so one copy takes it: the first replica's.
            if engine.first_local_replica != 0:
                return tf.no_op()
            copy = var.values[0]
            with tf.device(copy.device), UpdateContext(0):
                return fn(copy, *args, **kwargs)
        if isinstance(var, ShardedVariable):
            return update_regroup(
                engine, engine.update_shards(var, fn, args, kwargs), group
            )
        return self.update_mirrored(engine, var, fn, args, kwargs, group)

    def update_mirrored(self, engine, var, fn, args, kwargs, group):
        """The update of a variable with a whole copy on every replica."""
        return engine.mirrored_update(var, fn, args, kwargs, group)


def sum_gradients(engine, grads) -> list:
    """The sum over the replicas of each of `grads`, in one batched reduction
    through the gradient engine. Rows a sparse gradient repeats on every
    replica (a lookup that does not depend on the batch) are summed row by
    row (`shared_rows.py`)."""
    if not grads:
        return []
    shared = [SharedRows.of(g) for g in grads]
    values = [
        g if rows is None else rows.values
        for g, rows in zip(grads, shared, strict=True)
    ]
    sums = engine.reduce_gradients([(v, v) for v in values])
    return [
        total if rows is None else rows.rebuild(total)
        for total, rows in zip(sums, shared, strict=True)
    ]
