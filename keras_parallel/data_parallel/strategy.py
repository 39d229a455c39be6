"""`DataParallel`: synchronous data parallelism for Keras `fit` on one host."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import MirroredExtended, SavedWithModel
from keras_parallel.data_parallel import batch_split
from keras_parallel.data_parallel.cluster import resolve_cluster
from keras_parallel.data_parallel.periodic_averaging import resolve_averaging
from keras_parallel.data_parallel.replica_features import ReplicaFeatures, has_integers
from keras_parallel.data_parallel.sharding import resolve_sharding
from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.reduction.compression import Compression, resolve_compression
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.scope_errors import explained


class DataParallel(tf.distribute.Strategy, SavedWithModel):
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
    can be created one after another in a process), and by default splits
    the optimizer state evenly over the devices.

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
            compressed; BatchNormalization statistics stay exact.
        sharding: What is split over the devices (the stages of ZeRO,
            Rajbhandari et al., 2020). `"auto"` (default): `"optimizer"`,
            or None with `sync_every` > 1.
            `"optimizer"`: the optimizer state. Every slot is cut
            by rows into one equal part per device, each device updates its
            part of every weight, and the parts are gathered into every
            copy. Gradients are all-reduced, so every compression applies.
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

    # Read by MirroredExtended, and by the multi-worker engine as its first
    # collective group key; on one machine no collective ops are launched.
    _collective_key_base = 0

    # What `DataParallel(...)` makes on a cluster of two or more workers:
    # `multi_worker.py` names its subclass here (the package imports both), so
    # that this module does not import the one that derives from it.
    _on_cluster: type[DataParallel] | None = None

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
    ):
        del cluster_resolver  # __new__ resolved it into self._cluster
        averaging, sharding, sync_batch_norm = resolve_averaging(
            sync_every, outer_optimizer, sharding, sync_batch_norm
        )
        sharding = resolve_sharding(
            sharding, shard_optimizer, resolve_compression(compression)
        )
        extended = self._make_extended(
            devices,
            reduction=reduction,
            bucket_mb=bucket_mb,
            compression=compression,
            sharding=sharding,
            sync_batch_norm=sync_batch_norm,
            averaging=averaging,
        )
        # Not super(): a multi-worker DataParallel also derives from
        # MultiWorkerMirroredStrategy, whose constructor builds its own engine.
        tf.distribute.Strategy.__init__(self, extended)

    def _make_extended(self, devices, reduction, bucket_mb, compression, **updates):
        """The extended for this machine's devices; the arguments are
        `__init__`'s (`updates`: sharding, sync_batch_norm, averaging)."""
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
            cls = DataParallel._on_cluster
        strategy = super().__new__(cls)
        strategy._cluster = cluster
        return strategy

    def scope(self):
        """`tf.distribute.Strategy.scope`: models, optimizers and metrics
        made in it are distributed. An optimizer made outside the scope and
        used by a model made in it gets an error naming it and the fix.

        Returns:
            A context manager.
        """
        return explained(super().scope())

    @property
    def num_replicas_in_sync(self) -> int:
        """Replicas training together (across workers). Inside a replica of a
        Keras `train_step`, `test_step` or `predict_step` it reads 1: each
        replica computes its loss as one device would, and the strategy
        weighs the replicas by their shares of the batch (docs/data_parallel.md: "How
        losses count")."""
        extended = self.extended
        return extended._loss_weights.replicas_seen(extended._num_replicas_in_sync)

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
        """Bytes the gradient reduction and the weight gathers move per
        replica, per training step and per optimizer update.

        Read after `fit` has run (or traced) a step; before, the counts are 0.
        With `gradient_accumulation_steps=k` in the optimizer, replicas
        accumulate locally and reduce once per update, so a step sends 1/k of
        an update's bytes.

        Returns:
            A dict with `bytes_per_step` (gradient bytes each replica puts
            into all-reduces and reduce-scatters, averaged over the steps of
            an update), `bytes_per_update`, `steps_per_update`,
            `all_reduce_bytes_per_step`, `reduce_scatter_bytes_per_step` and
            `all_gather_bytes_per_step` (the buffers of each kind of
            collective; the sharding modes gather weights),
            `ring_bytes_per_step` (what a replica sends when each collective
            runs as a ring: the traffic to compare between modes),
            `fp32_bytes_per_step` (what plain float32 gradients would send),
            `warmup_bytes_per_step`, `reductions` (all-reduces and
            reduce-scatters per update), `reduction`, `compression` and
            `buckets` (one dict per collective: label, tensors, elements,
            dtype, bytes, phase, kind).

        Example:

        ```python
        strategy = keras_parallel.DataParallel(compression="bf16")
        ...  # build and compile in strategy.scope()
        model.fit(x, y, epochs=1)
        stats = strategy.communication_stats()
        stats["bytes_per_step"] / stats["fp32_bytes_per_step"]  # 0.5
        ```
        """
        stats = self.extended._gradient_reduction.communication_stats()
        steps = self.extended.steps_per_update
        per_update = stats["bytes_per_step"]
        if steps > 1:
            for key in (
                "bytes_per_step",
                "fp32_bytes_per_step",
                "warmup_bytes_per_step",
                "all_reduce_bytes_per_step",
                "reduce_scatter_bytes_per_step",
                "all_gather_bytes_per_step",
                "ring_bytes_per_step",
            ):
                stats[key] /= steps
        return dict(stats, bytes_per_update=per_update, steps_per_update=steps)

    def save_own_variables(self, store) -> None:
        """Keras' saving hook: what the gradient compression keeps between
        steps (PowerSGD's error memory, warm start and step count), one
        entry per optimizer, goes into the checkpoint of every model built in
        this scope (`save_weights`, `ModelCheckpoint`, `BackupAndRestore`).

        Args:
            store: Keras' weights store of this object (a dict of arrays).
        """
        states = self.extended._gradient_reduction.states
        for index, arrays in enumerate(states.save()):
            for name, array in arrays.items():
                store[f"{index}:{name}"] = array

    def load_own_variables(self, store) -> None:
        """Keras' loading hook: restores what `save_own_variables` saved.

        Args:
            store: Keras' weights store of this object (empty for a file saved
                without compression state).
        """
        saved: dict[int, dict[str, np.ndarray]] = {}
        for key in store.keys():
            index, name = key.split(":", 1)
            saved.setdefault(int(index), {})[name] = np.asarray(store[key])
        self.extended._gradient_reduction.states.restore(
            [saved[index] for index in sorted(saved)]
        )

    def __repr__(self) -> str:
        devices = ", ".join(short_device(d) for d in self.extended.worker_devices)
        return f"DataParallel(devices=[{devices}])"


class DataParallelExtended(ReplicaFeatures, MirroredExtended):
    """Strategy internals on one machine: MirroredStrategy's replica machinery
    with our own input splitting, reduction and update placement."""

    def __init__(
        self,
        container_strategy,
        devices,
        exact,
        gradients,
        sharding,
        sync_batch_norm,
        averaging,
    ):
        super().__init__(container_strategy, devices=devices, cross_device_ops=exact)
        self._init_features(gradients, sharding, sync_batch_norm, averaging)

    def _use_merge_call(self):
        # Every cross-replica exchange goes through our reduction engine;
        # collective ops (the other branch) break re-created strategies.
        return not self._applying_once

    def _get_cross_device_ops(self, value):
        if has_integers(value):
            return tf.distribute.ReductionToOneDevice()
        if self._reducing_gradients:
            return self._gradient_reduction
        # Not MirroredExtended's choice: it turns to collective ops whenever
        # merge calls are off, as they are while the optimizer applies once.
        return self._cross_device_ops

    def _replica_loss_weights(self, sizes):
        return batch_split.replica_loss_weights(sizes, len(self._devices))
