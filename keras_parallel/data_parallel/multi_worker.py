"""DataParallel across processes and machines, on tf.distribute's collective
engine (the one under `tf.distribute.MultiWorkerMirroredStrategy`).

Each worker process runs the same program. TensorFlow starts a gRPC server in
each, broadcasts the chief's initial variable values and sums gradients with
collective ops. On top of that engine this adds what `DataParallel` does on
one machine: every worker reads whole global batches and cuts its replicas'
pieces inside the step (no multi-device iterator rebuilt every epoch),
gradients go through our reduction engine
(bucketing, fp16/bf16, PowerSGD, sent as collectives), BatchNormalization
uses global-batch statistics, and optimizer state is sharded over a worker's
own devices. It also makes Keras 3's `fit` run at all: Keras reduces a whole
data batch with one `strategy.reduce` call, which MultiWorkerMirroredStrategy
rejects (keras-team/keras#20585).
"""

from __future__ import annotations

import itertools

import tensorflow as tf

from keras_parallel._tf_internal import (
    CollectiveAllReduceExtended,
    PerReplica,
    num_workers,
    wait_for_all_workers,
    worker_id,
)
from keras_parallel.collective_saves import every_worker_is_saving
from keras_parallel.data_parallel.collective_watch import (
    CollectiveWatch,
    report_stalled_workers,
)
from keras_parallel.data_parallel.engine import DataParallelEngine
from keras_parallel.data_parallel.file_collisions import (
    explain_lock_errors,
    warn_about_keras_writers,
)
from keras_parallel.data_parallel.lost_workers import report_lost_workers
from keras_parallel.reduction.algorithms import CollectiveAllReduce
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.specialize import step_model

IMPLEMENTATIONS = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


# Strategies made in this process, counted alike on every worker (they make
# them in the same order), and how long one waits for the others to make its.
_CREATIONS = itertools.count()
STRATEGY_TIMEOUT_SECONDS = 600
# Seconds a collective waits for the other workers (DataParallel's
# `collective_timeout`): generous, for another worker's first trace.
COLLECTIVE_TIMEOUT = 1800.0


def check_collective_timeout(seconds: float | None) -> float | None:
    """`seconds` if it is a valid `collective_timeout`, else a clear error."""
    if seconds is None or (
        isinstance(seconds, (int, float))
        and not isinstance(seconds, bool)
        and seconds > 0
    ):
        return seconds
    raise ValueError(
        "`collective_timeout` must be a number of seconds > 0, or None to "
        "wait for ever. Received: "
        f"collective_timeout={seconds!r}"
    )


class OnCluster:
    """What a DataParallel on a cluster of two or more workers does
    differently from one on one machine (`strategy.MultiWorkerDataParallel`
    puts it first)."""

    @property
    def num_workers(self) -> int:
        return num_workers(self.extended)

    @property
    def worker_index(self) -> int:
        return worker_id(self.extended)

    @property
    def is_chief(self) -> bool:
        return self.extended.should_checkpoint

    def experimental_distribute_dataset(self, dataset, options=None):
        # Keras' `fit` distributes its data before it runs any callback: the
        # first point where a strategy hook runs inside `fit`.
        warn_about_keras_writers()
        return super().experimental_distribute_dataset(dataset, options)

    def reduce(self, reduce_op, value, axis):
        # Keras 3 takes every step's scalar logs through `reduce(MEAN, v,
        # axis=0)` under a multi-worker strategy, which fails for scalars
        # (keras-team/keras#20585). They are each replica's metric results
        # (read locally inside the step): averaged over the replicas of ALL
        # workers, as Keras averages them under every other strategy, every
        # worker logs the same numbers, and a NaN on one replica reaches every
        # worker's callbacks (TerminateOnNaN) in the same step.
        if axis is not None and _all_scalars(value):
            return self._mean_over_all_replicas(value)
        return super().reduce(reduce_op, value, axis)

    def _replica_total(self):
        if not every_worker_is_saving():
            # A save by one worker alone: no collective the others miss.
            return None

        def total(variables):
            # Every worker's replicas: PowerSGD's error memory is each
            # worker's own, and the others may restore from this save.
            value = PerReplica([variable.read_value() for variable in variables])
            summed = self.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
            return summed.numpy()

        return total

    def _mean_over_all_replicas(self, value):
        """All scalar logs in one collective: stacked per replica, averaged."""
        leaves = tf.nest.flatten(value)
        parts = [self.experimental_local_results(leaf) for leaf in leaves]
        replicas = max(len(p) for p in parts)
        stacked = []
        for replica in range(replicas):
            # A leaf that is not per-replica is the same on every replica.
            row = [p[replica] if len(p) > 1 else p[0] for p in parts]
            with tf.device(row[0].device):
                stacked.append(tf.stack([tf.cast(x, tf.float32) for x in row]))
        means = super().reduce(
            tf.distribute.ReduceOp.MEAN, PerReplica(stacked), axis=None
        )
        return tf.nest.pack_sequence_as(
            value, [tf.cast(means[i], p[0].dtype) for i, p in enumerate(parts)]
        )

    def _make_extended(self, devices, **options):
        return MultiWorkerExtended(self, self._cluster, devices, **options)

    def __repr__(self) -> str:
        return (
            f"DataParallel(worker {self.worker_index} of {self.num_workers}, "
            f"{self.num_replicas_in_sync} replicas)"
        )


class MultiWorkerExtended(DataParallelEngine, CollectiveAllReduceExtended):
    """Strategy internals across workers: the collective engine's cluster and
    variable initialisation, with DataParallel's input, reduction,
    BatchNormalization and update placement."""

    def __init__(
        self,
        container_strategy,
        cluster_resolver,
        devices,
        reduction,
        bucket_mb,
        compression,
        mode,
        sync_batch_norm,
        jit_compile,
        collective_timeout,
    ):
        if devices is not None:
            raise ValueError(
                "`devices` cannot be given when DataParallel runs on a cluster "
                "(TF_CONFIG or `cluster_resolver`): each worker trains on all "
                "its GPUs, or on its CPU when it has none. Received: "
                f"devices={devices!r}"
            )
        if reduction not in IMPLEMENTATIONS:
            raise ValueError(
                f"`reduction` must be one of {tuple(IMPLEMENTATIONS)} when "
                "DataParallel runs on several workers: 'auto' (ring over gRPC, "
                "NCCL between GPUs where TensorFlow picks it) or 'nccl'. "
                f"Received: reduction={reduction!r}"
            )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=IMPLEMENTATIONS[reduction]
        )
        try:
            super().__init__(
                container_strategy,
                cluster_resolver=cluster_resolver,
                communication_options=options,
            )
        except RuntimeError as error:
            if "program startup" not in str(error):
                raise
            raise RuntimeError(
                "DataParallel on a cluster must be created before TensorFlow "
                "starts (TensorFlow configures its collectives at startup), but "
                "something already made a tensor, variable, model or optimizer "
                "in this process. Create the strategy first in the script; give "
                "`outer_optimizer` as a name or config dict (e.g. {'class_name': "
                "'SGD', 'config': {'learning_rate': 0.7, 'momentum': 0.9, "
                "'nesterov': True}}) rather than an instance."
            ) from None
        # Made again in a running process (a notebook cell run twice), the
        # engine above resets this worker's collectives; a worker that sends
        # before its peer has reset makes the peer fail with "Delete called on
        # non-empty BufRendezvous". So no worker goes on before all are here.
        wait_for_all_workers(
            f"keras_parallel/strategy/{next(_CREATIONS)}", STRATEGY_TIMEOUT_SECONDS
        )
        report_stalled_workers()
        report_lost_workers()
        explain_lock_errors()
        self._collective_watch = CollectiveWatch(
            collective_timeout,
            worker_id(self),
            num_workers(self),
            f"/job:{cluster_resolver.task_type}/replica:0/task:"
            f"{cluster_resolver.task_id}",
        )
        algorithm = CollectiveAllReduce(self._cross_device_ops, num_workers(self))
        gradients = GradientReduction(
            algorithm, bucket_mb, compression, fallback=self._cross_device_ops
        )
        self._init_engine(gradients, mode, sync_batch_norm, jit_compile)

    def _step_listeners(self) -> dict:
        return {"collectives": self._collective_watch}

    def _call_for_each_replica(self, fn, args, kwargs):
        model = step_model(fn)
        if model is not None:
            if getattr(model, "steps_per_execution", 1) > 1:
                raise ValueError(
                    "DataParallel on several workers runs one step per "
                    "execution: TensorFlow's collectives cannot be traced "
                    "inside the tf.cond within tf.while_loop that Keras uses for "
                    "steps_per_execution > 1 (their call-time instance keys are "
                    "not fed there). Received: steps_per_execution="
                    f"{model.steps_per_execution}. Compile with "
                    "`steps_per_execution=1` (on one machine DataParallel "
                    "supports any value)."
                )
        return super()._call_for_each_replica(fn, args, kwargs)

    def _reduce_to(self, reduce_op, value, destinations, options):
        # Keras reduces a whole (x, y, sample_weight) batch in one call; the
        # collective engine takes one value at a time.
        return tf.nest.map_structure(
            lambda v: super(MultiWorkerExtended, self)._reduce_to(
                reduce_op, v, destinations, options
            ),
            value,
        )


def _all_scalars(value) -> bool:
    return all(
        part.shape.rank == 0
        for leaf in tf.nest.flatten(value)
        for part in getattr(leaf, "values", (leaf,))
    )
