"""All-reduce algorithms and their selection."""

import numpy as np
import pytest
import tensorflow as tf
from transparency import devices

from keras_parallel.reduction import GradientReduction, InProcessAllReduce
from keras_parallel.reduction.algorithms import resolve_algorithm


def parts_on(arrays, names, dtype=tf.float32):
    parts = []
    for array, name in zip(arrays, names, strict=True):
        with tf.device(name):
            parts.append(tf.constant(array, dtype))
    return parts


def test_in_process_sum_is_bit_identical_on_every_device():
    names = devices(4)
    arrays = [np.random.RandomState(i).rand(5, 3) for i in range(4)]
    sums = InProcessAllReduce().all_reduce(parts_on(arrays, names))
    assert [s.device.split("device:")[-1] for s in sums] == [n for n in names]
    np.testing.assert_allclose(sums[0], np.sum(arrays, axis=0), rtol=1e-6)
    for total in sums[1:]:
        np.testing.assert_array_equal(total, sums[0])


def test_in_process_adds_in_the_parts_dtype_as_collectives_do():
    # 2048 + 1 + 1 + 1 is 2051 in float32; in float16 (spacing 2 above 2048)
    # every +1 rounds away. NCCL and TensorFlow's collectives add in the parts'
    # dtype, so the in-process sum does too: one process and several workers
    # with as many replicas give the same numbers.
    values = [np.full([3], v) for v in (2048.0, 1.0, 1.0, 1.0)]
    parts = parts_on(values, devices(4), tf.float16)
    sums = InProcessAllReduce().all_reduce(parts)
    assert sums[0].dtype == tf.float16
    for total in sums:
        np.testing.assert_array_equal(total, np.full([3], 2048.0))


def test_auto_is_in_process_on_cpus():
    assert resolve_algorithm("auto", devices(2)).name == "in_process"


@pytest.mark.parametrize(
    "reduction, fragments",
    [
        ("ring", ["Unknown `reduction`: 'ring'", "'auto', 'in_process', 'nccl'"]),
        ("nccl", ["reduction='nccl' needs GPUs", "['CPU']", "'in_process'"]),
    ],
)
def test_bad_reduction(reduction, fragments):
    import keras_parallel

    with pytest.raises(ValueError) as raised:
        keras_parallel.DataParallel(devices(2), reduction=reduction)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_engine_plugs_into_mirrored_strategy():
    engine = GradientReduction("in_process", compression="bf16")
    strategy = tf.distribute.MirroredStrategy(devices(2), cross_device_ops=engine)

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            value = tf.fill([4], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
            return ctx.all_reduce("SUM", value)

        return strategy.run(replica_fn)

    results = strategy.experimental_local_results(step())
    for result in results:
        np.testing.assert_array_equal(result, [3.0] * 4)
    assert engine.communication_stats()["buckets"][0]["dtype"] == "bfloat16"
