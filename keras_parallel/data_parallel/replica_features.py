"""`ReplicaFeatures`: what DataParallel adds to tf.distribute's replica
machinery, on one machine and across workers."""

from __future__ import annotations

import contextlib
import weakref

import keras
import tensorflow as tf

from keras_parallel._tf_internal import (
    MirroredVariable,
    PerReplica,
    UpdateContext,
)
from keras_parallel.data_parallel import batch_split
from keras_parallel.data_parallel.element_shards import (
    WeightParts,
    splits_by_elements,
)
from keras_parallel.data_parallel.empty_pieces import EmptyPieces
from keras_parallel.data_parallel.local_accumulation import (
    LocalAccumulators,
)
from keras_parallel.data_parallel.loss_weights import LossWeights
from keras_parallel.data_parallel.ownership import OwnerTable
from keras_parallel.data_parallel.parameter_shards import (
    GatheredRows,
    require_elementwise,
)
from keras_parallel.data_parallel.shared_rows import SharedRows
from keras_parallel.data_parallel.state_placement import StatePlacement
from keras_parallel.data_parallel.step_tracing import StepTracing
from keras_parallel.reduction.engine import is_dense, local_parts
from keras_parallel.reduction.rows import join_rows
from keras_parallel.sharded_variable import ShardedValue, ShardedVariable


class ReplicaFeatures(StepTracing, StatePlacement):
    """What DataParallel adds to tf.distribute's replica machinery, on one
    machine (`DataParallelExtended`) and across workers (`multi_worker`):
    gradients through our reduction engine, synchronized BatchNormalization,
    the optimizer applied once on the reduced gradients, and training state
    split over the devices by `sharding` (`StatePlacement`).

    Mixed into a `MirroredExtended` subclass; `_init_features` must run in
    its constructor.
    """

    def _init_features(self, gradients, sharding, sync_batch_norm, averaging):
        self._gradient_reduction = gradients
        # `sync_every` > 1: the replicas' own steps and their meetings
        # (`periodic_averaging`); None for synchronous training.
        self._averaging = averaging
        self._piece_sizes = None  # of the step being traced, with averaging
        # True while the gradients of a step are reduced (so they take the
        # compressed path) and while the optimizer is applied once on them.
        self._reducing_gradients = False
        self._applying_once = False
        self._tracing_step = False
        self._warned_unreduced_update = False
        self._loss_weights = LossWeights()
        self._empty_pieces = EmptyPieces()
        # The optimizers made in the scope (`StatePlacement`): each applies
        # once on the reduced gradients.
        self._optimizers = weakref.WeakSet()
        self._replicas_per_piece = 1
        # `DataParallel(sharding=...)`: "optimizer", "gradients",
        # "parameters" or None.
        self._sharding = sharding
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
        if variables is not None and not optimizer.built:
            # As Keras' `apply` builds it, but before the gradients take
            # their path: accumulators made inside `apply` would miss the
            # local accumulation of this first step.
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
            optimizer.built = True
        with self._gradient_reduction.states.owned_by(optimizer):
            return self._apply_reduced(apply, grads, variables, optimizer)

    def _apply_reduced(self, apply, grads, variables, optimizer):
        if self._averaging is not None:
            return self._apply_locally(apply, grads, variables, optimizer)
        present = [i for i, g in enumerate(grads) if g is not None]
        if variables is not None:
            grads = [
                with_static_shape(g, v) for g, v in zip(grads, variables, strict=True)
            ]
        gathered = self._reduced_in_backward(variables, present, optimizer)
        grads = self._loss_weights.weigh_gradients(grads, summed=gathered)
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
            scattered = self._scattered(grads, variables, present, optimizer)
            summed = [i for i in present if i not in scattered + gathered]
            shared = [SharedRows.of(grads[i]) for i in summed]
            values = [
                grads[i] if rows is None else rows.values
                for i, rows in zip(summed, shared, strict=True)
            ]
            sums = self._reduce_gradients([(v, v) for v in values]) if summed else []
            sums = [
                total if rows is None else rows.rebuild(total)
                for total, rows in zip(sums, shared, strict=True)
            ]
            handed = list(grads)
            for i, value in zip(summed, sums, strict=True):
                handed[i] = self._gradient_for_update(value, variables, i)
            if scattered:
                rows = self._gradient_reduction.reduce_scatter(
                    [grads[i] for i in scattered]
                )
                for i, parts in zip(scattered, rows, strict=True):
                    shape = grads[i].values[0].shape
                    handed[i] = ShardedValue(
                        parts, lambda parts, shape=shape: join_rows(parts, shape)
                    )
            for i in gathered:
                weight = variables[i].value
                handed[i] = ShardedValue(local_parts(grads[i]), weight.join)
            self.steps_per_update = 1
            reading = contextlib.nullcontext()
        self._applying_once = True
        try:
            with reading:
                return apply(handed, variables)
        finally:
            self._applying_once = False

    def _apply_locally(self, apply, grads, variables, optimizer):
        """`sync_every` > 1: each replica's own optimizer step, on its own
        gradient, weights and optimizer state (an update context per replica
        makes every read and write of a mirrored variable its copy's)."""
        parts = [None if g is None else local_parts(g) for g in grads]
        self._averaging.stepping(optimizer)
        self.steps_per_update = self._averaging.sync_every * (
            getattr(optimizer, "gradient_accumulation_steps", None) or 1
        )
        sizes = self._piece_sizes or [None] * len(self._devices)
        self._applying_once = True
        try:
            for i, (device, size) in enumerate(zip(self._devices, sizes, strict=True)):
                with tf.device(device), UpdateContext(i), tf.name_scope(f"replica_{i}"):

                    def step(i=i):
                        apply([None if p is None else p[i] for p in parts], variables)
                        return tf.constant(True)

                    # A replica without samples (a short last batch) does not
                    # step: its gradient is of nothing.
                    batch_split.if_has_samples(size, step, lambda: tf.constant(False))
        finally:
            self._applying_once = False

    def _finish_local_step(self, entries) -> None:
        """After a training step with `sync_every` > 1: the replicas meet or
        keep their own weights (cross-replica context)."""
        self._applying_once = True  # the outer optimizer applies once
        try:
            self._averaging.finish_step(
                entries,
                self._sum_over_replicas,
                self._num_replicas_in_sync,
                self._piece_sizes,
            )
        finally:
            self._applying_once = False

    def _sum_over_replicas(self, tensors) -> list[list[tf.Tensor]]:
        """The sum over all replicas of each of `tensors` (one list of this
        process's parts each), through the gradient engine."""
        values = [
            PerReplica(parts) if len(parts) > 1 else parts[0] for parts in tensors
        ]
        with self._gradient_reduction.states.owned_by(self._averaging):
            sums = self._reduce_gradients([(v, v) for v in values])
        return [local_parts(total) for total in sums]

    def _scattered(self, grads, variables, present, optimizer) -> list[int]:
        """Indices of the gradients to reduce-scatter (`sharding="gradients"`):
        dense ones of weights an elementwise optimizer updates in parts (made
        now when the optimizer has no state to split, as plain SGD)."""
        if self._sharding != "gradients" or variables is None:
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
                self._weight_parts.add(variable)
                scattered.append(i)
        return scattered

    def _reduced_in_backward(self, variables, present, optimizer) -> list[int]:
        """Indices of the gradients of split weights (`sharding="parameters"`):
        each replica's is already the sum of its rows over all replicas."""
        if self._sharding != "parameters" or variables is None:
            return []
        found = [
            i
            for i in present
            if isinstance(getattr(variables[i], "value", None), GatheredRows)
        ]
        if found:
            require_elementwise(getattr(optimizer, "inner_optimizer", optimizer))
        return found

    @property
    def first_local_replica(self) -> int:
        """The replica index of this process's first device."""
        return self._get_replica_id_in_sync_group(0)

    def count_gather(self, weight) -> None:
        """Counts one all-gather of a split weight's parts in the step being
        traced (`parameter_shards`)."""
        part = weight.values[0]
        self._gradient_reduction.count_all_gather(
            part.shape.num_elements() * len(weight.values),
            part.dtype,
            weight.name.split(":")[0],
        )

    def scatter_rows(self, gradients, shape) -> list:
        """Cross-replica: each replica's rows of the sum of a split weight's
        per-replica gradients (dense, or sparse: kept sparse)."""
        return self._gradient_reduction.reduce_scatter_one(gradients, shape)

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
        if self._sharding is None or variables is None:
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


def with_static_shape(gradient, variable):
    """`gradient` of a replicated weight with the weight's static shape.

    The gradient of a Dense kernel applied to a 3-D input whose batch size is
    not known while tracing (a dataset's uneven last batch) has an unknown
    first dimension; the reduction's buckets and the sharded updates, which
    cut a whole value by its static shape, need it.
    """
    weight = getattr(variable, "value", variable)
    if not isinstance(weight, MirroredVariable) or isinstance(weight, ShardedVariable):
        return gradient

    def shaped(part):
        if isinstance(part, tf.Tensor) and not part.shape.is_fully_defined():
            with tf.device(part.device):
                return tf.ensure_shape(part, weight.shape)
        return part

    if isinstance(gradient, PerReplica):
        return PerReplica(tuple(shaped(part) for part in gradient.values))
    return shaped(gradient)


def has_integers(value) -> bool:
    return any(not tf.as_dtype(p.dtype).is_floating for p in local_parts(value))
