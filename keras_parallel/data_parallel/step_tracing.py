"""`StepTracing`: how DataParallel traces a step, on one machine and across
workers: its input (global batches split inside the step), the state of the
step being traced (each replica's loss weight, pieces left empty) and what
the step's objects do differently while it is traced."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel.data_parallel import batch_split, batchnorm
from keras_parallel.data_parallel.metric_results import GlobalResult, step_metrics
from keras_parallel.data_parallel.optimizer_step import ReplicaStepOptimizer
from keras_parallel.scope_errors import require_distributed
from keras_parallel.specialize import (
    keras_step,
    reachable,
    specialized,
)
from keras_parallel.xla import compiled_per_device, compiles, refuse_whole_step_xla


class StepTracing:
    """The step-tracing half of `engine.DataParallelEngine`, whose
    `_init_engine` sets the state it reads (`loss_weights`, `empty_pieces`,
    `optimizers`, `mode`, ...). Replicas of a step being traced ask it, in
    replica context, for their loss weight, share of the batch and whether
    they hold samples.
    """

    def replica_loss_weight(self):
        """This replica's loss weight in the step being traced, or None
        (`loss_weights`)."""
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return self.mode.replica_loss_weight(self, replica)

    def replica_has_samples(self) -> tf.Tensor | None:
        """Whether this replica's piece of the step being traced has samples
        (a bool tensor; replica context), or None when no piece is empty
        (`empty_pieces`)."""
        return self.empty_pieces.has_samples(self._local_replica())

    def replica_counts(self) -> tf.Tensor | bool | None:
        """Whether this replica's metric updates count (replica context):
        False for a replica whose piece another replica of its mesh group
        counts, a bool tensor when its piece may be empty, None when it
        counts."""
        local = self._local_replica()
        first, _, per_piece = self._input_share
        if (first + local) % per_piece:
            return False
        return self.empty_pieces.has_samples(local)

    def replica_share(self):
        """What this replica's logs and metric values count for: its share
        n_i / n of the batch of the step being traced (replica context)."""
        return self.loss_weights.counted(self._local_replica())

    def _local_replica(self) -> int:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.get_static_value(replica) - self.first_local_replica

    def _counted_shares(self, sizes) -> tf.Tensor | None:
        """Each local replica's share of the batch in logs and metrics: n_i /
        n, counting each piece once (by the first replica of its mesh
        group); None across workers, where the shares are taken as equal."""
        if sizes is None or self._num_replicas_in_sync != len(self._devices):
            return None
        first, _, per_piece = self._input_share
        counts = [float((first + i) % per_piece == 0) for i in range(len(sizes))]
        samples = tf.cast(tf.stack(sizes), tf.float64) * counts
        return samples / tf.reduce_sum(samples)

    def _replica_loss_weights(self, sizes):
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
            dataset, self._input_host, self._devices, *self._input_share
        )

    @property
    def _input_host(self) -> str:
        return self._input_workers_devices[0][0]

    @property
    def _input_share(self) -> tuple[int, int, int]:
        """(this process's first replica, all replicas, replicas per piece):
        which pieces of each global batch this process's replicas take."""
        return (
            self._get_replica_id_in_sync_group(0),
            self._num_replicas_in_sync,
            self.replicas_per_piece,
        )

    def _reduce_to(self, reduce_op, value, destinations, options):
        served = self.local_accumulators.read(value, destinations)
        if served is not None:
            return served
        return super()._reduce_to(
            reduce_op, batch_split.common_samples(value), destinations, options
        )

    def _call_for_each_replica(self, fn, args, kwargs):
        if self.step_counter is None:
            return self._traced_step(fn, args, kwargs)
        # Counted for `keras-parallel launch`, which names a stalled worker.
        return self.step_counter.counting(lambda: self._traced_step(fn, args, kwargs))

    def _traced_step(self, fn, args, kwargs):
        refuse_whole_step_xla("DataParallel")
        models = reachable(fn, (args, kwargs))
        for model in models:
            for variable in model.variables:
                require_distributed(variable.value, "DataParallel")
        layers = batchnorm.batch_norm_layers(models) if self.sync_batch_norm else []
        step = keras_step(fn)
        in_keras = step is not None
        metrics = step_metrics(models) if in_keras else []
        training = not in_keras or step[1] == "train_step"
        if in_keras:
            args = batch_split.split_whole_batch(
                args, self._input_host, self._devices, self._input_share
            )
        sizes = batch_split.piece_sizes(args)
        self.tracing = True
        try:
            with (
                self.loss_weights.step(
                    self._replica_loss_weights(sizes),
                    in_keras,
                    self._num_replicas_in_sync,
                    self._counted_shares(sizes),
                    self._num_replicas_in_sync // self.replicas_per_piece,
                ),
                self.empty_pieces.step(sizes if in_keras else None),
                self.gradient_reduction.recording_step(),
                specialized(layers, batchnorm.GlobalStatistics),
                specialized(metrics, GlobalResult),
                specialized(list(self.optimizers), ReplicaStepOptimizer),
                self._step_layers(models),
            ):
                args = self.empty_pieces.pad(args)
                with (
                    self.mode.step(self, models, sizes, training),
                    compiled_per_device(
                        compiles(self.jit_compile, self._devices, models),
                        transfers=False,
                    ),
                ):
                    outputs = super()._call_for_each_replica(fn, args, kwargs)
                outputs = self.empty_pieces.trim(outputs)
                return self.loss_weights.weigh_logs(outputs)
        finally:
            self.tracing = False

    def _step_layers(self, models):
        """What else the traced step's layers do differently (a context)."""
        del models
        return contextlib.nullcontext()
