"""`DataParallel`: synchronous data parallelism for Keras `fit` on one host."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib
from tensorflow.python.distribute import (
    distribute_lib,
    distribute_utils,
    mirrored_strategy,
)
from tensorflow.python.distribute import values as values_lib
from tensorflow.python.ops import control_flow_util

from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.reduction.compression import Compression
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.strategies import batch_split, batchnorm
from keras_parallel.strategies.cluster import resolve_cluster
from keras_parallel.strategies.optimizer_step import ReplicaStepOptimizer
from keras_parallel.strategies.ownership import OwnerTable
from keras_parallel.strategies.specialize import reachable, specialized


class DataParallel(tf.distribute.Strategy):
    """Splits each global batch across devices; one model copy per device.

    A drop-in replacement for `tf.distribute.MirroredStrategy` under Keras:
    build and compile the model in `strategy.scope()`, then call the usual
    `fit`, `evaluate` and `predict`. `batch_size` is the global batch; each
    step cuts it into one piece per device, runs forward and backward on every
    device, sums the gradients and applies one update, so training gives the
    numbers of single-device training.

    Compared with MirroredStrategy it feeds replicas without rebuilding a
    multi-device iterator each epoch, supports `steps_per_execution > 1`,
    never uses collective ops (so strategies for differently shaped models
    can be created one after another in a process), and by default applies
    each variable's optimizer update on one device only.

    Args:
        devices: A device name or list of names (`"GPU:0"`,
            `"/device:CPU:1"`, ...) with one replica per device. None means
            all GPUs, or all logical CPUs when there is no GPU (see
            `keras_parallel.virtual_devices`).
        cluster_resolver: The cluster to train on, as a
            `tf.distribute.cluster_resolver.ClusterResolver`. None reads the
            `TF_CONFIG` environment variable. With two or more tasks,
            DataParallel runs on TensorFlow's multi-worker collective engine,
            one process per task (`keras-parallel launch` starts such
            processes on one machine); without a cluster it trains on this
            machine's devices.
        reduction: The all-reduce algorithm: `"auto"` (NCCL between GPUs
            where TensorFlow has it, else in-process; TensorFlow's collectives
            across workers), `"in_process"` or `"nccl"`.
        bucket_mb: Gradients are fused into buckets of at most this many
            megabytes before they are reduced, so many small tensors make few
            reductions. None: the algorithm's default (0.25 in-process, 25
            for NCCL).
        compression: How gradients travel: None (their own dtype),
            `"fp16"` or `"bf16"` (half the bytes, added up in float32), or
            `keras_parallel.PowerSGD(rank=...)` (low-rank, with error
            feedback). Only the optimizer's gradient all-reduce is
            compressed; BatchNormalization statistics stay exact.
        shard_optimizer: If True (default), every variable has one owner
            device, chosen to balance bytes across devices: its optimizer
            slots live there, its update runs there once, and the new value
            is copied to the other devices (optimizer-state sharding as in
            ZeRO stage 1, Rajbhandari et al., 2020). If False, every device
            keeps full optimizer state and updates its own copy, as
            MirroredStrategy does.
        sync_batch_norm: If True (default), `BatchNormalization` layers of a
            model trained with this strategy compute mean and variance over
            the global batch, as on one device (masked inputs included), with
            one exchange per layer and without the cancellation of Keras'
            `synchronized=True`; the layers' own config is not changed. If
            False, each replica normalises with its own batch statistics,
            which skips that exchange.

    Raises:
        ValueError: for a malformed `TF_CONFIG` or cluster, a port of this
            task in use, or an option that does not apply across workers.

    Example:

    ```python
    strategy = keras_parallel.DataParallel()
    with strategy.scope():
        model = keras.Sequential([...])
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=256, epochs=3)
    ```
    """

    # Read by MirroredExtended, and by the multi-worker engine as its first
    # collective group key; on one machine no collective ops are launched.
    _collective_key_base = 0

    def __init__(
        self,
        devices: str | Sequence[str] | None = None,
        *,
        cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver
        | None = None,
        reduction: str = "auto",
        bucket_mb: float | None = None,
        compression: str | Compression | None = None,
        shard_optimizer: bool = True,
        sync_batch_norm: bool = True,
    ):
        for name, value in (
            ("shard_optimizer", shard_optimizer),
            ("sync_batch_norm", sync_batch_norm),
        ):
            if not isinstance(value, bool):
                raise TypeError(
                    f"`{name}` must be True or False. Received: {name}={value!r}"
                )
        del cluster_resolver  # __new__ resolved it into self._cluster
        cluster = self._cluster
        if cluster is None:
            devices = resolve_devices(devices)
            extended = DataParallelExtended(
                self,
                devices,
                exact=GradientReduction(reduction, bucket_mb, None, devices),
                gradients=GradientReduction(reduction, bucket_mb, compression, devices),
                shard_optimizer=shard_optimizer,
                sync_batch_norm=sync_batch_norm,
            )
        else:
            from keras_parallel.strategies.multi_worker import MultiWorkerExtended

            extended = MultiWorkerExtended(
                self,
                cluster,
                devices,
                reduction,
                bucket_mb,
                compression,
                shard_optimizer,
                sync_batch_norm,
            )
        # Not super(): a multi-worker DataParallel also derives from
        # MultiWorkerMirroredStrategy, whose constructor builds its own engine.
        tf.distribute.Strategy.__init__(self, extended)

    def __new__(cls, *args, cluster_resolver=None, **kwargs):
        # The cluster decides the class, so it is resolved here, before
        # __init__: TF_CONFIG is parsed and this task's port probed once.
        cluster = resolve_cluster(cluster_resolver)
        if cls is DataParallel and cluster is not None:
            from keras_parallel.strategies.multi_worker import MultiWorkerDataParallel

            cls = MultiWorkerDataParallel
        strategy = super().__new__(cls)
        strategy._cluster = cluster
        return strategy

    @property
    def num_workers(self) -> int:
        """Number of worker processes training together (1 on one machine)."""
        return 1

    @property
    def worker_index(self) -> int:
        """This process's index among the workers (0 on one machine)."""
        return 0

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints and logs (worker 0)."""
        return True

    def communication_stats(self) -> dict:
        """Bytes the gradient all-reduce of one training step sends per replica.

        Read after `fit` has run (or traced) a step; before, the counts are 0.

        Returns:
            A dict with `bytes_per_step`, `fp32_bytes_per_step` (what plain
            float32 gradients would send), `warmup_bytes_per_step`,
            `reductions` (all-reduces per step), `reduction`, `compression`
            and `buckets` (one dict per all-reduce: label, tensors, elements,
            dtype, bytes, phase).

        Example:

        ```python
        strategy = keras_parallel.DataParallel(compression="bf16")
        ...  # build and compile in strategy.scope()
        model.fit(x, y, epochs=1)
        stats = strategy.communication_stats()
        stats["bytes_per_step"] / stats["fp32_bytes_per_step"]  # 0.5
        ```
        """
        return self.extended._gradient_reduction.communication_stats()

    def __repr__(self) -> str:
        devices = ", ".join(short_device(d) for d in self.extended.worker_devices)
        return f"DataParallel(devices=[{devices}])"


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
        self._shard_optimizer = shard_optimizer
        self._sync_batch_norm = sync_batch_norm
        self._owners = OwnerTable(len(self._devices))

    def _get_cross_device_ops(self, value):
        if self._reducing_gradients and not _has_integers(value):
            return self._gradient_reduction
        return super()._get_cross_device_ops(value)

    def _use_merge_call(self):
        # The optimizer applied once runs in cross-replica context, where
        # Keras' merge calls must call through.
        return not self._applying_once and super()._use_merge_call()

    def apply_reduced(self, apply, grads, variables):
        """Reduces all replicas' gradients in one batch and runs the
        optimizer's own `apply` once on them (cross-replica context).

        Args:
            apply: Its original `apply`, bound.
            grads: One per-replica gradient (or None) per variable.
            variables: The variables, or None for the optimizer's own.

        Returns:
            What `apply` returns.
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        self._reducing_gradients = True
        try:
            sums = self.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(grads[i], grads[i]) for i in present],
            )
        finally:
            self._reducing_gradients = False
        reduced = list(grads)
        for i, value in zip(present, sums, strict=True):
            reduced[i] = self._gradient_for_update(value, variables, i)
        self._applying_once = True
        try:
            return apply(reduced, variables)
        finally:
            self._applying_once = False

    def _gradient_for_update(self, value, variables, index):
        # With sharded updates only the owner's copy of a sum is read.
        if not self._shard_optimizer or variables is None:
            return value
        variable = getattr(variables[index], "value", variables[index])
        if not (
            isinstance(variable, values_lib.MirroredVariable)
            and isinstance(value, values_lib.DistributedValues)
        ):
            return value  # one local replica gives a plain tensor
        return value.values[self._owners.owner(variable)]

    def replica_loss_weight(self):
        """This replica's loss weight in the step being traced, or None."""
        if self._loss_weights is None:
            return None
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.gather(self._loss_weights, replica)

    def _replica_sample_weights(self, args):
        """Each replica's loss weight for this step, or None for equal ones."""
        return None

    # Input: every process reads whole global batches and keeps its replicas'
    # pieces of each.

    def _experimental_distribute_dataset(self, dataset, options):
        if (
            options is not None
            and options.experimental_replication_mode
            == distribute_lib.InputReplicationMode.PER_REPLICA
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
        )

    def _reduce_to(self, reduce_op, value, destinations, options):
        return super()._reduce_to(
            reduce_op, batch_split.common_samples(value), destinations, options
        )

    def _call_for_each_replica(self, fn, args, kwargs):
        if control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        ):
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
        self._loss_weights = self._replica_sample_weights(args)
        self._tracing_step = True
        try:
            with (
                specialized(layers, batchnorm.GlobalStatistics),
                specialized(optimizers, ReplicaStepOptimizer),
            ):
                return super()._call_for_each_replica(fn, args, kwargs)
        finally:
            self._loss_weights = None
            self._tracing_step = False

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
        colocate_with = kwargs.get("colocate_with")
        if self._shard_optimizer and isinstance(
            colocate_with, values_lib.MirroredVariable
        ):
            # An optimizer slot: one copy, on the owner of its variable.
            kwargs.pop("colocate_with")
            device = colocate_with.values[self._owners.owner(colocate_with)].device
            with tf.device(device):
                return next_creator(**kwargs)
        variable = super()._create_variable(next_creator, **kwargs)
        if isinstance(variable, values_lib.MirroredVariable):
            self._owners.assign(variable)
        return variable

    def _update(self, var, fn, args, kwargs, group):
        if (
            self._tracing_step
            and not self._applying_once
            and getattr(var, "trainable", False)
        ):
            self._warn_unreduced_update(var)
        if self._applying_once and not isinstance(
            var, values_lib.DistributedVariable
        ):
            # Optimizer state on its variable's owner (accumulators, moving
            # averages): updated where it lives, once.
            with tf.device(var.device), distribute_lib.UpdateContext(var.device):
                return fn(var, *args, **kwargs)
        _require_distributed(var)
        if not (self._shard_optimizer and isinstance(var, values_lib.MirroredVariable)):
            return super()._update(var, fn, args, kwargs, group)
        owner = self._owners.owner(var)
        components = var.values
        with (
            tf.device(components[owner].device),
            distribute_lib.UpdateContext(owner),
            tf.name_scope(f"update_{owner}"),
        ):
            result = fn(
                components[owner],
                *distribute_utils.select_replica(owner, args),
                **distribute_utils.select_replica(owner, kwargs),
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
        return distribute_utils.update_regroup(self, updates, group)


class DataParallelExtended(ReplicaFeatures, mirrored_strategy.MirroredExtended):
    """Strategy internals on one machine: MirroredStrategy's replica machinery
    with our own input splitting, reduction and update placement."""

    def __init__(
        self,
        container_strategy,
        devices,
        exact,
        gradients,
        shard_optimizer,
        sync_batch_norm,
    ):
        super().__init__(container_strategy, devices=devices, cross_device_ops=exact)
        self._init_features(gradients, shard_optimizer, sync_batch_norm)

    def _use_merge_call(self):
        # Every cross-replica exchange goes through our reduction engine;
        # collective ops (the other branch) break re-created strategies.
        return not self._applying_once

    def _get_cross_device_ops(self, value):
        if _has_integers(value):
            return cross_device_ops_lib.ReductionToOneDevice()
        return super()._get_cross_device_ops(value)

    def _replica_sample_weights(self, args):
        return batch_split.replica_loss_weights(args, len(self._devices))


def _has_integers(value) -> bool:
    parts = value.values if isinstance(value, values_lib.DistributedValues) else [value]
    return any(not tf.as_dtype(p.dtype).is_floating for p in parts)


def _require_distributed(variable) -> None:
    if not isinstance(variable, values_lib.DistributedVariable):
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
