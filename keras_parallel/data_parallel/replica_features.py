"""`ReplicaFeatures`: what DataParallel adds to tf.distribute's replica
machinery, on one machine and across workers."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel._tf_internal import (
    DistributedVariable,
    MirroredVariable,
    SyncOnReadVariable,
    UpdateContext,
    in_xla_context,
    keras_scope,
    select_replica,
    update_regroup,
)
from keras_parallel.data_parallel import batch_split, batchnorm
from keras_parallel.data_parallel.element_shards import (
    WeightParts,
    create_row_shards,
    is_whole,
    splits_by_elements,
)
from keras_parallel.data_parallel.local_accumulation import (
    LocalAccumulators,
    is_accumulator,
)
from keras_parallel.data_parallel.optimizer_step import ReplicaStepOptimizer
from keras_parallel.data_parallel.ownership import OwnerTable
from keras_parallel.specialize import reachable, specialized
from keras_parallel.split_variable import SplitVariable


class ReplicaFeatures:
    """What DataParallel adds to tf.distribute's replica machinery, on one
    machine (`DataParallelExtended`) and across workers (`multi_worker`):
    gradients through our reduction engine, synchronized BatchNormalization,
    and optimizer updates on one owner device per variable.

    Mixed into a `MirroredExtended` subclass; `_init_features` must run in
    its constructor.
    """

    def _init_features(self, gradients, shard_optimizer, sync_batch_norm):
        self._gradient_reduction = gradients
        # True while the gradients of a step are reduced (so they take the
        # compressed path) and while the optimizer is applied once on them.
        self._reducing_gradients = False
        self._applying_once = False
        self._tracing_step = False
        self._warned_unreduced_update = False
        self._loss_weights = None
        self._replicas_per_piece = 1
        self._shard_optimizer = shard_optimizer
        self._sync_batch_norm = sync_batch_norm
        self._owners = OwnerTable(len(self._devices))
        self._weight_parts = WeightParts()
        self._local_accumulators = LocalAccumulators(
            self._reduce_gradients, self._local_results
        )
        # Steps per optimizer update in the step traced last (Keras'
        # `gradient_accumulation_steps` when accumulating locally).
        self.steps_per_update = 1

    def _get_cross_device_ops(self, value):
        if self._reducing_gradients and not has_integers(value):
            return self._gradient_reduction
        return super()._get_cross_device_ops(value)

    def _use_merge_call(self):
        # The optimizer applied once runs in cross-replica context, where
        # Keras' merge calls must call through.
        return not self._applying_once and super()._use_merge_call()

    def apply_reduced(self, apply, grads, variables, optimizer=None):
        """Reduces all replicas' gradients in one batch and runs the
        optimizer's own `apply` once on them (cross-replica context).

        An optimizer that accumulates gradients (`gradient_accumulation_steps`)
        keeps each replica's sum local instead, and its update reads them
        reduced in one batch (`local_accumulation.py`).

        Args:
            apply: Its original `apply`, bound.
            grads: One per-replica gradient (or None) per variable.
            variables: The variables, or None for the optimizer's own.
            optimizer: The optimizer applying: the owner of the compression
                state (PowerSGD's error memory) its gradients use.

        Returns:
            What `apply` returns.
        """
        with self._gradient_reduction.states.owned_by(optimizer):
            return self._apply_reduced(apply, grads, variables)

    def _apply_reduced(self, apply, grads, variables):
        present = [i for i, g in enumerate(grads) if g is not None]
        accumulators = (
            None
            if variables is None
            else self._local_accumulators.of(
                getattr(apply, "__self__", None), variables
            )
        )
        if accumulators is not None:
            self._local_accumulators.add(accumulators, grads)
            # The gradient is already in the accumulators: Keras adds zero.
            handed = [
                None if g is None else tf.zeros(v.shape, v.dtype)
                for g, v in zip(grads, variables, strict=True)
            ]
            self.steps_per_update = apply.__self__.gradient_accumulation_steps
            reading = self._local_accumulators.reading(accumulators)
        else:
            sums = self._reduce_gradients([(grads[i], grads[i]) for i in present])
            handed = list(grads)
            for i, value in zip(present, sums, strict=True):
                handed[i] = self._gradient_for_update(value, variables, i)
            self.steps_per_update = 1
            reading = contextlib.nullcontext()
        self._applying_once = True
        try:
            with reading:
                return apply(handed, variables)
        finally:
            self._applying_once = False

    def _reduce_gradients(self, pairs):
        """SUM of `(value, destinations)` pairs through the gradient engine."""
        self._reducing_gradients = True
        try:
            return self.batch_reduce_to(tf.distribute.ReduceOp.SUM, pairs)
        finally:
            self._reducing_gradients = False

    def _gradient_for_update(self, value, variables, index):
        # With sharded updates only the owner's copy of a sum is read; a
        # weight updated in parts reads each replica's own.
        if not self._shard_optimizer or variables is None:
            return value
        variable = getattr(variables[index], "value", variables[index])
        if self._weight_parts.of(variable) is not None:
            return value
        if not (
            isinstance(variable, MirroredVariable)
            and isinstance(value, tf.distribute.DistributedValues)
        ):
            return value  # one local replica gives a plain tensor
        return value.values[self._owners.owner(variable)]

    def replica_loss_weight(self):
        """This replica's loss weight in the step being traced, or None."""
        if self._loss_weights is None:
            return None
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.gather(self._loss_weights, replica)

    def _replica_loss_weights(self, args):
        """Each replica's loss weight for this step, or None for equal ones."""
        return None

    # Input: every process reads whole global batches and keeps its replicas'
    # pieces of each.

    def _experimental_distribute_dataset(self, dataset, options):
        if (
            options is not None
            and options.experimental_replication_mode
            == tf.distribute.InputReplicationMode.PER_REPLICA
        ):
            raise NotImplementedError(
                "InputReplicationMode.PER_REPLICA is only supported by "
                "`distribute_datasets_from_function`."
            )
        return batch_split.SplitBatchDataset(
            dataset,
            self._input_workers_devices[0][0],
            self._devices,
            first_replica=self._get_replica_id_in_sync_group(0),
            num_replicas=self._num_replicas_in_sync,
            replicas_per_piece=self._replicas_per_piece,
        )

    def _reduce_to(self, reduce_op, value, destinations, options):
        served = self._local_accumulators.read(value, destinations)
        if served is not None:
            return served
        return super()._reduce_to(
            reduce_op, batch_split.common_samples(value), destinations, options
        )

    def _call_for_each_replica(self, fn, args, kwargs):
        if in_xla_context():
            raise ValueError(
                "DataParallel cannot run inside an XLA-compiled function: XLA "
                "compiles a function for one device, and DataParallel runs one "
                "replica per device. Compile the model with "
                "`model.compile(..., jit_compile=False)` (Keras picks "
                "jit_compile=True by default on machines with a GPU)."
            )
        models, optimizers = reachable(fn, (args, kwargs))
        for model in models:
            for variable in model.variables:
                _require_distributed(variable.value)
        layers = batchnorm.batch_norm_layers(models) if self._sync_batch_norm else []
        self._loss_weights = self._replica_loss_weights(args)
        self._tracing_step = True
        try:
            with (
                specialized(layers, batchnorm.GlobalStatistics),
                specialized(optimizers, ReplicaStepOptimizer),
                self._step_layers(models),
            ):
                return super()._call_for_each_replica(fn, args, kwargs)
        finally:
            self._loss_weights = None
            self._tracing_step = False

    def _step_layers(self, models):
        """What else the traced step's layers do differently (a context)."""
        del models
        return contextlib.nullcontext()

    def _warn_unreduced_update(self, var) -> None:
        if self._warned_unreduced_update:
            return
        self._warned_unreduced_update = True
        tf.get_logger().warning(
            "DataParallel: the trainable variable %r is updated from inside "
            "`strategy.run` by code DataParallel did not find in the step "
            "function (an optimizer reached only through another object's "
            "attribute, or a manual assign). An optimizer found there would "
            "clip, accumulate and average the whole batch's gradient, as on "
            "one device; this one works on each replica's part, as under "
            "MirroredStrategy. Keep the optimizer in the step function's "
            "closure or globals, or pass it in `strategy.run(..., args=...)`.",
            var.name,
        )

    # Variables.

    def _create_variable(self, next_creator, **kwargs):
        if is_accumulator(kwargs):
            return self._local_accumulators.create(
                lambda **kw: super(ReplicaFeatures, self)._create_variable(
                    next_creator, **kw
                ),
                kwargs,
            )
        colocate_with = kwargs.get("colocate_with")
        if (
            self._shard_optimizer
            and isinstance(colocate_with, MirroredVariable)
            and not isinstance(colocate_with, SplitVariable)
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
        _require_distributed(var)
        if self._applying_once and isinstance(var, SyncOnReadVariable):
            # A local gradient accumulator: its value is the sum of its copies
            # (on all workers) and this update's value is the whole batch's,
            # so one copy takes it: the first replica's.
            if self._get_replica_id_in_sync_group(0) != 0:
                return tf.no_op()
            copy = var.values[0]
            with tf.device(copy.device), UpdateContext(0):
                return fn(copy, *args, **kwargs)
        if isinstance(var, SplitVariable):
            return update_regroup(
                self, self._update_parts(var, fn, args, kwargs), group
            )
        if self._weight_parts.of(var) is not None:
            results = self._weight_parts.update(
                var, fn, args, kwargs, select_replica, UpdateContext
            )
            return update_regroup(self, results, group)
        if not (self._shard_optimizer and isinstance(var, MirroredVariable)):
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

    def _update_parts(self, var, fn, args, kwargs) -> list:
        """`fn` on each copy of a split variable, with whole values among its
        arguments (an assigned weight, a clipped gradient) cut to the copy's
        part and the parts of split values (state, gradients) as they are."""
        shape = var.full_shape
        results = []
        for i, copy in enumerate(var.values):

            def cut(value, i=i):
                return var.part_of(value, i) if is_whole(value, shape) else value

            with tf.device(copy.device), UpdateContext(i), tf.name_scope(f"update_{i}"):
                results.append(
                    fn(
                        copy,
                        *tf.nest.map_structure(cut, select_replica(i, args)),
                        **tf.nest.map_structure(cut, select_replica(i, kwargs)),
                    )
                )
        return results


def has_integers(value) -> bool:
    parts = (
        value.values if isinstance(value, tf.distribute.DistributedValues) else [value]
    )
    return any(not tf.as_dtype(p.dtype).is_floating for p in parts)


def _require_distributed(variable) -> None:
    if not isinstance(variable, DistributedVariable):
        raise ValueError(
            f"Variable {variable.name!r} was created outside "
            "`DataParallel.scope()`, so it lives on one device only. Build and "
            "compile the model inside the scope:\n"
            "    with strategy.scope():\n"
            "        model = ...\n"
            "        model.compile(...)\n"
            "To move an existing model, rebuild it in the scope and copy its "
            "weights: `new = keras.models.clone_model(model)` and "
            "`new.set_weights(model.get_weights())` inside `strategy.scope()`."
        )
