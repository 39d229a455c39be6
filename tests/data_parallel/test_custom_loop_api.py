"""The tf.distribute API of custom loops gives MirroredStrategy's results.

Reference: MirroredStrategy on the same devices with a non-collective
reduction (which, unlike its collective default, can be created again in one
process, tensorflow/tensorflow#62790), fed the same values.
"""

import numpy as np
import pytest
import tensorflow as tf
from transparency import devices

import keras_parallel


def per_replica_values(strategy):
    """A [3, 2] tensor per replica, different on each."""

    def value(context):
        replica = tf.cast(context.replica_id_in_sync_group, tf.float32)
        return tf.reshape(tf.range(6, dtype=tf.float32), (3, 2)) * (replica + 1.0)

    return strategy.experimental_distribute_values_from_function(value)


def local(strategy, value):
    return [t.numpy() for t in strategy.experimental_local_results(value)]


def replica_all_reduce(strategy):
    def step(x):
        context = tf.distribute.get_replica_context()
        return (
            context.all_reduce("SUM", x),
            context.all_reduce("MEAN", x),
            context.all_reduce("SUM", [x, 2.0 * x])[1],
        )

    results = strategy.run(step, args=(per_replica_values(strategy),))
    return [local(strategy, r) for r in results]


def replica_merge_call(strategy):
    def merged(strategy, x):
        return strategy.reduce("SUM", x, axis=None)

    def step(x):
        context = tf.distribute.get_replica_context()
        total = context.merge_call(merged, args=(x,))
        return x * total + tf.cast(context.replica_id_in_sync_group, tf.float32)

    return local(strategy, strategy.run(step, args=(per_replica_values(strategy),)))


def cross_replica_reduce(strategy):
    value = per_replica_values(strategy)
    return [
        strategy.reduce(op, value, axis=axis).numpy()
        for op in ("SUM", "MEAN")
        for axis in (None, 0, 1)
    ]


def gather(strategy):
    value = per_replica_values(strategy)
    return [strategy.gather(value, axis=axis).numpy() for axis in (0, 1)]


def run_in_function(strategy):
    @tf.function
    def step(x):
        def replica(x):
            return tf.reduce_sum(x) * 2.0

        results = strategy.run(replica, args=(x,))
        return strategy.reduce("MEAN", results, axis=None), results

    mean, results = step(per_replica_values(strategy))
    return [mean.numpy(), local(strategy, results)]


def num_replicas(strategy):
    return strategy.num_replicas_in_sync


CASES = [
    replica_all_reduce,
    replica_merge_call,
    cross_replica_reduce,
    gather,
    run_in_function,
    num_replicas,
]


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_equals_mirrored_strategy(case, num_devices):
    mirrored = tf.distribute.MirroredStrategy(
        devices(num_devices), cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    expected = case(mirrored)
    got = case(keras_parallel.DataParallel(devices(num_devices)))
    tf.nest.map_structure(np.testing.assert_allclose, got, expected)
