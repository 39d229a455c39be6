"""LocalSum: the in-process all-reduce."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import values as values_lib
from transparency import devices

from keras_parallel.reduction import LocalSum


def per_replica(arrays, names):
    parts = []
    for array, name in zip(arrays, names, strict=True):
        with tf.device(name):
            parts.append(tf.identity(array))
    return values_lib.PerReplica(tuple(parts))


@pytest.mark.parametrize(
    "op", [tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN]
)
def test_every_destination_gets_the_reduction(op):
    names = devices(4)
    arrays = [np.random.RandomState(i).rand(5, 3).astype("float32") for i in range(4)]
    value = per_replica(arrays, names)
    reduced = LocalSum().reduce(op, value, destinations=value)
    expected = np.sum(arrays, axis=0) / (4 if op == tf.distribute.ReduceOp.MEAN else 1)
    assert [t.device for t in reduced.values] == [t.device for t in value.values]
    for part in reduced.values:
        np.testing.assert_allclose(part, expected, rtol=1e-6)
    # Same additions in the same order on every device: bit-identical copies.
    for part in reduced.values[1:]:
        np.testing.assert_array_equal(part, reduced.values[0])


def test_indexed_slices_are_concatenated():
    names = devices(2)
    slices = []
    for i, name in enumerate(names):
        with tf.device(name):
            slices.append(
                tf.IndexedSlices(
                    tf.fill([1, 2], float(i + 1)), tf.constant([i]), tf.constant([3, 2])
                )
            )
    reduced = LocalSum().reduce(
        tf.distribute.ReduceOp.SUM, values_lib.PerReplica(tuple(slices)), names[0]
    )
    np.testing.assert_array_equal(
        tf.convert_to_tensor(reduced), [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]
    )


def test_plugs_into_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(devices(2), cross_device_ops=LocalSum())

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(
                "SUM", tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
            )

        return strategy.run(replica_fn)

    result = strategy.experimental_local_results(step())
    assert [float(r) for r in result] == [3.0, 3.0]
