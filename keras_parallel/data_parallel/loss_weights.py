"""How much each replica's loss counts in a step: decided by the strategy.

Keras divides a loss by the number of replicas where its own loss classes
reduce (`scale_loss_for_distribution`), so that summing the replicas'
gradients gives the mean over the batch. A loss a user writes by hand (an
overridden `compute_loss`, a `train_step` computing `ops.mean(...)`) is not
divided: under MirroredStrategy it trains with N times one device's gradient,
and a loss Keras divided is logged 1/N of its value by a custom `train_step`.

Inside a Keras step (`train_step`, `test_step`, `predict_step`) DataParallel
therefore lets each replica compute what one device would: its strategy
reports one replica in sync there, so every loss means the mean over the
replica's own samples, and the strategy alone weighs replica i by its share
n_i / n of the batch. The weight goes on the loss when the step calls
`optimizer.scale_loss` (Keras' own `train_step` does), which is exact for any
split, also through synchronized BatchNormalization; otherwise on the
replica's gradients before they are summed, which is the same thing when the
batch splits evenly. Custom loops (`strategy.run` on a function of one's own)
keep tf.distribute's meaning: the gradients are summed, as under
MirroredStrategy.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel._tf_internal import PerReplica
from keras_parallel.sparse_gradients import times


class LossWeights:
    """Each replica's loss weight in the step being traced.

    One per strategy; `step` opens the state of each traced step.
    """

    def __init__(self):
        self._num_replicas = 1
        self._keras_step = False
        # N * n_i / n per replica (a tensor), or None for equal shares.
        self._shares = None
        self._counted = None
        self._on_loss = False

    @contextlib.contextmanager
    def step(
        self,
        shares: tf.Tensor | None,
        keras_step: bool,
        num_replicas: int,
        counted: tf.Tensor | None = None,
        averaged: int | None = None,
    ):
        """The context of one traced step.

        Args:
            shares: N * n_i / n for each local replica (`batch_split`), or
                None when the replicas hold equal shares.
            keras_step: Whether the step is a Keras model's `train_step`,
                `test_step` or `predict_step`.
            num_replicas: N, the replicas in sync (across workers).
            counted: What each local replica's logs and metric values count
                for: its share of the batch, or 0 for a replica whose
                samples another replica of its mesh group counts. None: 1/N.
            averaged: How many replicas' logs Keras averages (N, or the
                number of mesh groups); None: N.
        """
        self._shares, self._keras_step, self._on_loss = shares, keras_step, False
        self._num_replicas, self._counted = num_replicas, counted
        self._averaged = averaged or num_replicas
        try:
            yield
        finally:
            self._shares, self._keras_step, self._on_loss = None, False, False
            self._counted = None

    def replicas_seen(self, num_replicas: int) -> int:
        """What `num_replicas_in_sync` reads: 1 in a replica of a Keras step,
        so that Keras divides no loss; else `num_replicas`."""
        if self._keras_step and tf.distribute.get_replica_context() is not None:
            return 1
        return num_replicas

    def for_loss(self, replica) -> tf.Tensor | float | None:
        """The factor `optimizer.scale_loss` applies to replica `replica`'s
        loss, or None for none. In a Keras step the loss is then weighted, and
        its gradients are summed as they are."""
        scale = 1 / self._num_replicas if self._keras_step else 1.0
        if self._keras_step:
            self._on_loss = True
        if self._shares is None:
            return scale if self._keras_step else None
        return tf.gather(self._shares, replica) * scale

    def share(self, replica) -> tf.Tensor | float:
        """Replica `replica`'s share n_i / n of the batch (its loss weight)."""
        if self._shares is None:
            return 1 / self._num_replicas
        return tf.gather(self._shares, replica) / self._num_replicas

    def counted(self, replica: int) -> tf.Tensor | float:
        """What local replica `replica`'s logs and metric values count for
        (`step`)."""
        if self._counted is None:
            return 1 / self._num_replicas
        return tf.gather(self._counted, replica)

    def weigh_logs(self, outputs):
        """A Keras step's `outputs` with each replica's float scalar (a log
        such as the loss the step computed) times what the replica counts
        for, times the number of values Keras averages, so that their mean is
        the whole batch's."""
        if not self._keras_step or self._counted is None:
            return outputs

        def weigh(value):
            if not isinstance(value, PerReplica) or not all(
                part.shape.rank == 0 and part.dtype.is_floating for part in value.values
            ):
                return value
            weighted = []
            for i, part in enumerate(value.values):
                with tf.device(part.device):
                    factor = self._averaged * self.counted(i)
                    weighted.append(part * tf.cast(factor, part.dtype))
            return PerReplica(weighted)

        return tf.nest.map_structure(weigh, outputs)

    def weigh_gradients(self, grads: list, summed: tuple = ()) -> list:
        """`grads` (per-replica or None) with each replica's gradient times
        its share n_i / n, in a Keras step whose loss was not weighted.

        Args:
            grads: One per-replica gradient (or None) per variable.
            summed: Indices of gradients each replica holds already summed
                over all replicas (`sharding="parameters"`): they take the
                mean share 1/N, exact when the batch splits evenly.
        """
        if not self._keras_step or self._on_loss:
            return grads
        return [
            None if g is None else self._weighted(g, equal=i in summed)
            for i, g in enumerate(grads)
        ]

    def _weighted(self, gradient, equal: bool):
        parts = gradient.values if isinstance(gradient, PerReplica) else (gradient,)
        weighted = []
        for i, part in enumerate(parts):
            with tf.device(part.device):
                share = 1 / self._num_replicas if equal else self.share(i)
                weighted.append(times(part, share))
        if isinstance(gradient, PerReplica):
            return PerReplica(weighted)
        return weighted[0]
