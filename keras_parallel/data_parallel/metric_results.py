"""A metric's result inside a Keras step is the whole batch's, as on one device.

Keras 3 keeps each metric's state per replica (synchronized on read) and a
step's logs are each replica's `metric.result()`, read inside the replica and
then averaged by Keras: the progress bar, `on_train_batch_end` and TensorBoard
per step show the mean of the replicas' own results, so counts (true
positives, `Sum`) show 1/N of their value and ratios (Precision, AUC, a mean
over an uneven split) are off until the epoch ends, where Keras reads the
state across replicas. tf.keras 2 computed a result in a replica by a merge
call, across replicas; while DataParallel traces a Keras step, the metrics of
its models do that again (`GlobalResult`, put before their class through
`specialize.py`), so every replica returns the global result.

A `Mean` or `Sum` updated with a scalar and no sample weight (a loss tracker
given the step's loss) takes one value per replica where one device takes one
per batch: each replica's value then counts by its share n_i / n of the
batch, so that the tracker holds what one device's would also when a batch
splits unevenly.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class GlobalResult:
    """Put before a metric's class while DataParallel traces a Keras step.

    The strategy's extended must provide, in replica context,
    `replica_share()` (what this replica's values count for) and
    `replica_counts()` (whether its updates count: None, a bool or a bool
    tensor).
    """

    def update_state(self, *args, **kwargs):
        context = tf.distribute.get_replica_context()
        if context is None:
            return super().update_state(*args, **kwargs)
        # A replica computing on a padding sample (`empty_pieces`), or on a
        # piece another replica of its mesh group counts, updates nothing.
        counts = context.strategy.extended.replica_counts()
        if counts is None:
            return self._update_replica(context, args, kwargs)
        if counts is False:
            return None

        def update():
            self._update_replica(context, args, kwargs)
            return tf.constant(True)

        return tf.cond(counts, update, lambda: tf.constant(False))

    def _update_replica(self, context, args, kwargs):
        if (
            isinstance(self, (keras.metrics.Mean, keras.metrics.Sum))
            and len(args) <= 1
            and kwargs.get("sample_weight") is None
        ):
            values = tf.convert_to_tensor(args[0] if args else kwargs["values"])
            if values.shape.rank == 0:
                share = tf.cast(context.strategy.extended.replica_share(), values.dtype)
                return super().update_state(values, sample_weight=share)
        return super().update_state(*args, **kwargs)

    def result(self):
        context = tf.distribute.get_replica_context()
        if context is None or context.strategy.extended._num_replicas_in_sync == 1:
            return super().result()
        # In cross-replica context a metric's variables read as their sum over
        # all replicas (and workers): the result of the whole batch.
        return context.merge_call(lambda _: super(GlobalResult, self).result())


def step_metrics(models) -> list[keras.metrics.Metric]:
    """The metrics of `models` a step's logs may read: each model's `metrics`
    (its loss trackers, compiled metrics and the metrics it lists)."""
    found: dict[int, keras.metrics.Metric] = {}
    for model in models:
        for metric in model.metrics:
            found.setdefault(id(metric), metric)
    return list(found.values())
