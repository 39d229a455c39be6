"""`DataParallelEngine`: DataParallel's replica machinery, on one machine
(`strategy.DataParallelExtended`) and across workers (`multi_worker`).

It runs the replicas of a traced step (`StepTracing`), sends gradients
through the reduction engine, runs an optimizer's own `apply` once on them,
and creates and updates variables; what differs between ways of training is
asked of the strategy's mode (`modes/`), chosen once at construction.
"""

from __future__ import annotations

import contextlib
import weakref

import keras
import tensorflow as tf

from keras_parallel._tf_internal import (
    MirroredVariable,
    PerReplica,
    UpdateContext,
    keras_scope,
    select_replica,
)
from keras_parallel.data_parallel.element_shards import update_shard
from keras_parallel.data_parallel.empty_pieces import EmptyPieces
from keras_parallel.data_parallel.local_accumulation import LocalAccumulators
from keras_parallel.data_parallel.loss_weights import LossWeights
from keras_parallel.data_parallel.step_tracing import StepTracing
from keras_parallel.reduction.engine import local_parts
from keras_parallel.scope_errors import require_distributed
from keras_parallel.sharded_variable import ShardedVariable
from keras_parallel.step_progress import step_counter


class DataParallelEngine(StepTracing):
    """Mixed into a `MirroredExtended` subclass; `_init_engine` must run in
    its constructor.

    Its phase while a step is traced — `tracing`, the gradients being
    reduced, the optimizer `applying` once — decides which cross-device ops
    and merge calls tf.distribute's own machinery uses.
    """

    def _init_engine(
        self, gradients, mode, sync_batch_norm: bool, jit_compile: bool | str
    ) -> None:
        self.gradient_reduction = gradients
        self.jit_compile = jit_compile
        self.mode = mode
        self.sync_batch_norm = sync_batch_norm
        self.loss_weights = LossWeights()
        self.local_accumulators = LocalAccumulators(
            self.reduce_gradients, self._local_results
        )
        self.empty_pieces = EmptyPieces()
        # The optimizers made in the scope: each applies once on the reduced
        # gradients.
        self.optimizers = weakref.WeakSet()
        # Replicas of a mesh group, which take the same piece of each batch.
        self.replicas_per_piece = 1
        # Steps per optimizer update in the step traced last.
        self.steps_per_update = 1
        self.tracing = False
        self.applying = False
        self._reducing_gradients = False
        self._warned_unreduced_update = False
        self.step_counter = step_counter(self._input_host, **self._step_listeners())
        mode.attach(self)

    def _step_listeners(self) -> dict:
        """Who watches the step counts besides the launcher
        (`step_progress.step_counter`)."""
        return {}

    @property
    def devices(self) -> tuple[str, ...]:
        """This process's replica devices."""
        return tuple(self._devices)

    @property
    def num_replicas(self) -> int:
        """Replicas in sync, on all workers."""
        return self._num_replicas_in_sync

    @property
    def first_local_replica(self) -> int:
        """The replica index of this process's first device."""
        return self._get_replica_id_in_sync_group(0)

    def container_strategy(self):
        """The strategy this engine belongs to."""
        return self._container_strategy()

    # tf.distribute's hooks.

    def _get_cross_device_ops(self, value):
        if self._reducing_gradients and not has_integers(value):
            return self.gradient_reduction
        return super()._get_cross_device_ops(value)

    def _use_merge_call(self):
        # The optimizer applied once runs in cross-replica context, where
        # Keras' merge calls must call through.
        return not self.applying and super()._use_merge_call()

    def colocate_vars_with(self, colocate_with_variable):
        # Keras' optimizer builds its slots through this scope of the strategy
        # it was made in; a weight made outside that strategy's scope would
        # otherwise fail with "Need to be inside strategy.scope()".
        if isinstance(colocate_with_variable, tf.Variable):
            require_distributed(colocate_with_variable, "DataParallel")
        return super().colocate_vars_with(colocate_with_variable)

    def _create_variable(self, next_creator, **kwargs):
        # Every optimizer making its variables in the scope (its iteration
        # counter, at construction) is known, however the step reaches it.
        caller = keras_scope()[1]
        if isinstance(caller, keras.optimizers.Optimizer):
            self.optimizers.add(caller)
        return self.mode.create_variable(self, next_creator, kwargs)

    def _update(self, var, fn, args, kwargs, group):
        return self.mode.update(self, var, fn, args, kwargs, group)

    # What modes build on.

    def mirrored(self, next_creator, kwargs: dict):
        """tf.distribute's own variable for `kwargs` (mirrored, or
        sync-on-read)."""
        return super()._create_variable(next_creator, **kwargs)

    def mirrored_update(self, var, fn, args, kwargs, group):
        """tf.distribute's own update of `var`: `fn` on every copy."""
        return super()._update(var, fn, args, kwargs, group)

    @contextlib.contextmanager
    def applying_once(self, reading=None):
        """While an optimizer applies once (cross-replica context), with
        `reading` (a context, or None) open."""
        self.applying = True
        try:
            with reading or contextlib.nullcontext():
                yield
        finally:
            self.applying = False

    def apply_reduced(self, apply, grads, variables, optimizer=None):
        """Runs an optimizer's own `apply` on all replicas' gradients, as the
        mode does it (cross-replica context; `optimizer_step.py`).

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
        with self.gradient_reduction.states.owned_by(optimizer):
            return self.mode.apply(self, apply, grads, variables, optimizer)

    def reduce_gradients(self, pairs) -> list:
        """SUM of `(value, destinations)` pairs through the gradient engine."""
        self._reducing_gradients = True
        try:
            return self.batch_reduce_to(tf.distribute.ReduceOp.SUM, pairs)
        finally:
            self._reducing_gradients = False

    def sum_over_replicas(self, tensors, owner) -> list[list[tf.Tensor]]:
        """The sum over all replicas of each of `tensors` (one list of this
        process's parts each), through the gradient engine, with `owner`'s
        compression state."""
        values = [
            PerReplica(parts) if len(parts) > 1 else parts[0] for parts in tensors
        ]
        with self.gradient_reduction.states.owned_by(owner):
            sums = self.reduce_gradients([(v, v) for v in values])
        return [local_parts(total) for total in sums]

    def update_shards(self, var, fn, args, kwargs) -> list:
        """`fn` on each copy of a sharded variable, with whole values among
        its arguments (an assigned weight, a clipped gradient) cut to the
        copy's shard and the shards of sharded values (state, gradients) as
        they are."""
        shape = var.full_shape
        results = []
        for i, copy in enumerate(var.values):
            with tf.device(copy.device), UpdateContext(i), tf.name_scope(f"update_{i}"):
                results.append(
                    update_shard(
                        fn,
                        copy,
                        select_replica(i, args),
                        select_replica(i, kwargs),
                        shape,
                        lambda value, i=i: var.shard_of(value, replica=i),
                    )
                )
        return results

    def warn_unreduced_update(self, var) -> None:
        """Warns once of a trainable variable updated inside `strategy.run`
        by other code than an optimizer made in the scope."""
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

    # Split weights (`parameter_shards`).

    def count_gather(self, weight) -> None:
        """Counts one all-gather of a split weight's parts in the step being
        traced."""
        self.gradient_reduction.count_all_gather(
            weight.values[0], len(weight.values), weight.name.split(":")[0]
        )

    def scatter_rows(self, gradients, shape) -> list:
        """Cross-replica: each replica's rows of the sum of a split weight's
        per-replica gradients (dense, or sparse: kept sparse)."""
        return self.gradient_reduction.reduce_scatter_one(gradients, shape)

    @staticmethod
    def with_static_shape(gradient, variable):
        """`gradient` of a replicated weight with the weight's static shape.

        The gradient of a Dense kernel applied to a 3-D input whose batch
        size is not known while tracing (a dataset's uneven last batch) has
        an unknown first dimension; the reduction's buckets and the sharded
        updates, which cut a whole value by its static shape, need it.
        """
        weight = getattr(variable, "value", variable)
        if not isinstance(weight, MirroredVariable) or isinstance(
            weight, ShardedVariable
        ):
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
