"""`DataParallel`: synchronous data parallelism for Keras `fit` on one host."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_parallel._tf_internal import CollectiveAllReduceStrategy, MirroredExtended
from keras_parallel.data_parallel import batch_split
from keras_parallel.data_parallel.cluster import resolve_cluster
from keras_parallel.data_parallel.engine import DataParallelEngine, has_integers
from keras_parallel.data_parallel.modes import choose_mode
from keras_parallel.data_parallel.multi_worker import (
    COLLECTIVE_TIMEOUT,
    OnCluster,
    check_collective_timeout,
)
from keras_parallel.data_parallel.replica_strategy import ReplicaStrategy
from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.reduction.compression import Compression, resolve_compression
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.xla import check_jit_compile


class DataParallel(ReplicaStrategy):
    """Splits each global batch across devices; one model copy per device.

    A drop-in replacement for `tf.distribute.MirroredStrategy` under Keras:
    build and compile the model in `strategy.scope()`, then call the usual
    `fit`, `evaluate` and `predict`. `batch_size` is the global batch; each
    step cuts it into one piece per device, runs forward and backward on every
    device, sums the gradients and applies one update, so training gives the
    numbers of single-device training. The optimizer's own `apply` runs once
    on the summed gradients, so clipping, gradient accumulation, moving
    averages, weight decay and loss scaling behave as on one device, in
    `fit`, in a custom `train_step` and in custom loops.

    Compared with MirroredStrategy it feeds replicas without rebuilding a
    multi-device iterator each epoch, supports `steps_per_execution > 1`,
    never uses collective ops (so strategies for differently shaped models
    can be created one after another in a process), and by default
    (without compression) splits the optimizer state over the devices,
    balanced by bytes.

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
            `"fp16"` or `"bf16"` (half the bytes, added in that dtype), or
            `keras_parallel.PowerSGD(rank=...)` (low-rank, with error
            feedback). Only the optimizer's gradient all-reduce is
            compressed; BatchNormalization statistics stay exact, and the
            weights a sharding mode gathers travel as they are.
        sharding: What is split over the devices (the stages of ZeRO,
            Rajbhandari et al., 2020). `"auto"` (default): `"optimizer"`,
            except that the state of a weight under 2 Mi (2**21) elements
            stays whole on one device, chosen to balance bytes, which
            updates it and sends it to the others (a small weight's update
            costs per op, not per element: done once, not on every device);
            with a `compression`, None unless the devices' memory requires
            splitting (the weights sent are not compressed; see
            `communication_stats`); None with `sync_every` > 1.
            `"optimizer"`: the optimizer state. Every slot is cut
            by rows into one equal part per device, each device updates its
            part of every weight, and the parts are gathered into every
            copy, uncompressed (with a `compression` a warning says what
            that gather adds). Gradients are all-reduced, so every
            compression applies.
            `"gradients"`: also the summed gradients. They are
            reduce-scattered, so each device receives only the rows it
            updates (half the traffic of an all-reduce); compression None,
            `"fp16"` or `"bf16"`.
            `"parameters"`: also the weights. Every trainable weight is cut
            by rows into one part per device; a layer gathers its weights
            from all devices when its call begins, their gradients are
            reduce-scattered in the backward pass, and each device updates
            only its part, so each holds 1/N of the weights and optimizer
            state. Needs an elementwise Keras optimizer (SGD, Adam, AdamW,
            ...); its gradient accumulators are split too.
            None: nothing; every device keeps full optimizer state and
            updates its own copy, as MirroredStrategy does.
            Optimizers whose update is not elementwise (LAMB, Adafactor,
            Muon, subclasses) keep each variable's state whole on one owner
            device, chosen to balance bytes, under `"optimizer"` and
            `"gradients"`; sparse (embedding) gradients are all-reduced.
        shard_optimizer: Deprecated: True is `sharding="optimizer"`, False
            is `sharding=None`.
        sync_batch_norm: If True (the default unless `sync_every` > 1),
            `BatchNormalization` layers of a model trained with this strategy
            compute mean and variance over the global batch, as on one device
            (masked inputs included), with one exchange per layer and without
            the cancellation of Keras' `synchronized=True`; the layers' own
            config is not changed. If False, each replica normalises with its
            own batch statistics, which skips that exchange.
        sync_every: Optimizer updates each replica makes alone between two
            synchronizations. 1 (default): synchronous training. H > 1: local
            SGD (Stich, 2019): each replica applies its own gradients to its
            own weights, with its own optimizer state, and every H updates
            the replicas average what they learnt since they last met (one
            all-reduce of the weights' bytes, through the same reduction and
            `compression`, instead of the gradients' at every step).
            BatchNormalization then normalises with each replica's batch and
            its moving statistics are averaged at each synchronization.
            Outside a training step (`evaluate`, `predict`, saving,
            callbacks, `get_weights`) the model holds the synchronized
            weights; what the replicas learnt since stays with them until
            their next meeting, also across `fit` calls. `set_weights` and
            loading reach every replica.
        outer_optimizer: With `sync_every` > 1, the optimizer that moves the
            synchronized weights by the replicas' average change, taken as
            its gradient (DiLoCo, Douillard et al., 2023:
            `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)`). An
            instance (its config is used), a name or a config dict; across
            workers a name or config dict, as an instance starts TensorFlow
            before the strategy. None: the plain average.
        jit_compile: Whether each replica's part of a step (its forward,
            backward and part of the optimizer update) runs compiled by XLA
            on its device, with the gradient reduction between the compiled
            parts (`keras_parallel/xla.py`): True, False, or `"auto"`
            (default: on GPUs, when every layer of the model supports XLA,
            as Keras decides `jit_compile="auto"` on one device). Use this
            rather than `model.compile(jit_compile=True)`, with which Keras
            compiles all replicas into one program for one device (an error
            says so); Keras' own `"auto"` turns XLA off under any
            tf.distribute strategy.
        collective_timeout: Across workers, seconds a worker waits inside
            one step (in its collectives) for the others before the step
            fails with an error naming the workers behind it and their last
            completed step, so that a worker stuck outside its step (in a
            data loader, a callback, a file system call) ends the job rather
            than hanging it (default 1800: room for another worker's first
            trace). None waits for ever. Unused on one machine. Under
            `keras-parallel launch`, its `--timeout` (900 s) comes first.

    Raises:
        ValueError: for a malformed `TF_CONFIG` or cluster, a port of this
            task in use, an option that does not apply across workers, or
            options that do not combine (a sharding mode or synchronized
            BatchNormalization with `sync_every` > 1, an `outer_optimizer`
            without it).

    Example:

    ```python
    strategy = keras_parallel.DataParallel()
    with strategy.scope():
        model = keras.Sequential([...])
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=256, epochs=3)
    ```
    """

    def __init__(
        self,
        devices: str | Sequence[str] | None = None,
        *,
        cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
        reduction: str = "auto",
        bucket_mb: float | None = None,
        compression: str | Compression | None = None,
        sharding: str | None = "auto",
        shard_optimizer: bool | None = None,
        sync_batch_norm: bool | None = None,
        sync_every: int = 1,
        outer_optimizer: keras.optimizers.Optimizer | None = None,
        jit_compile: bool | str = "auto",
        collective_timeout: float | None = COLLECTIVE_TIMEOUT,
    ):
        del cluster_resolver  # __new__ resolved it into self._cluster
        mode, sync_batch_norm = choose_mode(
            sharding=sharding,
            shard_optimizer=shard_optimizer,
            compression=resolve_compression(compression),
            sync_every=sync_every,
            outer_optimizer=outer_optimizer,
            sync_batch_norm=sync_batch_norm,
        )
        extended = self._make_extended(
            devices,
            reduction=reduction,
            bucket_mb=bucket_mb,
            compression=compression,
            mode=mode,
            sync_batch_norm=sync_batch_norm,
            jit_compile=check_jit_compile(jit_compile),
            collective_timeout=check_collective_timeout(collective_timeout),
        )
        # Not super(): a multi-worker DataParallel also derives from
        # MultiWorkerMirroredStrategy, whose constructor builds its own engine.
        tf.distribute.Strategy.__init__(self, extended)

    def _make_extended(
        self, devices, reduction, bucket_mb, compression, collective_timeout, **updates
    ):
        """The extended for this machine's devices; the arguments are
        `__init__`'s (`updates`: the mode and sync_batch_norm)."""
        del collective_timeout  # one process has no collectives to wait for
        devices = resolve_devices(devices)
        return DataParallelExtended(
            self,
            devices,
            exact=GradientReduction(reduction, bucket_mb, None, devices),
            gradients=GradientReduction(reduction, bucket_mb, compression, devices),
            **updates,
        )

    def __new__(cls, *args, cluster_resolver=None, **kwargs):
        # The cluster decides the class, so it is resolved here, before
        # __init__: TF_CONFIG is parsed and this task's port probed once.
        cluster = resolve_cluster(cluster_resolver)
        if cls is DataParallel and cluster is not None:
            cls = MultiWorkerDataParallel
        strategy = super().__new__(cls)
        strategy._cluster = cluster
        return strategy

    def __repr__(self) -> str:
        devices = ", ".join(short_device(d) for d in self.extended.worker_devices)
        return f"DataParallel(devices=[{devices}])"


class MultiWorkerDataParallel(OnCluster, DataParallel, CollectiveAllReduceStrategy):
    """What `DataParallel(...)` returns when it finds a cluster of two or more
    workers. It is also a `tf.distribute.MultiWorkerMirroredStrategy`, so that
    Keras gathers `predict` outputs from all workers."""


class DataParallelExtended(DataParallelEngine, MirroredExtended):
    """Strategy internals on one machine: MirroredStrategy's replica machinery
    with our own input splitting, reduction and update placement."""

    def __init__(
        self,
        container_strategy,
        devices,
        exact,
        gradients,
        mode,
        sync_batch_norm,
        jit_compile,
    ):
        super().__init__(container_strategy, devices=devices, cross_device_ops=exact)
        self._init_engine(gradients, mode, sync_batch_norm, jit_compile)

    def _initialize_single_worker(self, devices):
        # MirroredStrategy's setup logs "Using MirroredStrategy with devices";
        # a DataParallel user was never using MirroredStrategy.
        with _without_records(_MIRRORED_LOG):
            super()._initialize_single_worker(devices)
        tf.get_logger().info(
            "Using %s with devices %s",
            type(self._container_strategy()).__name__,
            ", ".join(short_device(d) for d in devices),
        )

    def _use_merge_call(self):
        # Every cross-replica exchange goes through our reduction engine;
        # collective ops (the other branch) break re-created strategies.
        return not self.applying

    def _get_cross_device_ops(self, value):
        if has_integers(value):
            return tf.distribute.ReductionToOneDevice()
        if self._reducing_gradients:
            return self.gradient_reduction
        # Not MirroredExtended's choice: it turns to collective ops whenever
        # merge calls are off, as they are while the optimizer applies once.
        return self._cross_device_ops

    def _replica_loss_weights(self, sizes):
        return batch_split.replica_loss_weights(sizes, len(self._devices))


_MIRRORED_LOG = "Using MirroredStrategy"


@contextlib.contextmanager
def _without_records(prefix: str):
    """TensorFlow's logger drops records whose message starts with
    `prefix` while the context is open."""

    def keep(record) -> bool:
        return not str(record.msg).startswith(prefix)

    logger = tf.get_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
