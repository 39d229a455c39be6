"""fp16 / bf16 transfer: precision, range, bytes, training, bad input."""

import numpy as np
import pytest
import tensorflow as tf
from compression_tasks import demo_convnet
from transparency import devices

import keras_parallel
from keras_parallel.reduction import Communicator, InProcessAllReduce
from keras_parallel.reduction.compression import HalfPrecision, resolve_compression


def reduce_with(compression, arrays_per_gradient, num_replicas=2):
    """Sums gradients given as `arrays[k][i]` through `compression`."""
    names = devices(num_replicas)
    gradients = []
    for arrays in arrays_per_gradient:
        parts = []
        for array, name in zip(arrays, names, strict=True):
            with tf.device(name):
                parts.append(tf.constant(array, tf.float32))
        gradients.append(parts)
    communicator = Communicator(InProcessAllReduce(), 2**20, num_replicas)
    sums = compression.reduce(gradients, communicator)
    return [[np.asarray(s) for s in row] for row in sums], communicator.transfers


@pytest.mark.parametrize("magnitude", [1e6, 1.0, 1e-9])
def test_fp16_keeps_large_and_tiny_gradients(magnitude):
    # float16 alone overflows past 65504 and flushes below 6e-8 to zero; the
    # power-of-two scale moves every bucket into its range.
    rng = np.random.RandomState(0)
    arrays = [magnitude * rng.uniform(-1, 1, (3, 50)) for _ in range(2)]
    (sums,), _ = reduce_with(HalfPrecision("float16"), [arrays])
    exact = arrays[0] + arrays[1]
    for total in sums:
        assert total.dtype == np.float32
        assert np.all(np.isfinite(total))
        # float16 keeps 11 significant bits: each part is off by <= 2**-11
        # of the bucket's largest magnitude, and the float16 sum (at most
        # twice that magnitude) by <= 2**-11 of itself.
        np.testing.assert_allclose(total, exact, rtol=0, atol=4 * 2**-11 * magnitude)
    np.testing.assert_array_equal(sums[0], sums[1])


def test_fp16_sum_of_many_replicas_does_not_overflow():
    # Each part fits float16 after scaling, but so must their sum: 4 x 3e4.
    arrays = [np.full([8], 3e4) for _ in range(4)]
    (sums,), _ = reduce_with(HalfPrecision("float16"), [arrays], num_replicas=4)
    np.testing.assert_allclose(sums[0], np.full([8], 1.2e5), rtol=1e-3)


def test_bf16_has_float32_range_and_8_bits():
    rng = np.random.RandomState(1)
    arrays = [1e30 * rng.uniform(0.5, 1, (40,)) for _ in range(2)]
    (sums,), transfers = reduce_with(HalfPrecision("bfloat16"), [arrays])
    np.testing.assert_allclose(sums[0], arrays[0] + arrays[1], rtol=2 * 2**-8)
    assert [t.label for t in transfers] == ["bucket 0"]  # no scale exchanged


def test_half_precision_halves_the_bytes_on_the_wire():
    arrays = [[np.ones([10, 10]), np.ones([10, 10])], [np.ones([7]), np.ones([7])]]
    _, fp16 = reduce_with(HalfPrecision("float16"), arrays)
    _, bf16 = reduce_with(HalfPrecision("bfloat16"), arrays)
    _, fp32 = reduce_with(resolve_compression(None), arrays)
    assert [(t.dtype, t.elements, t.bytes) for t in fp32] == [("float32", 107, 428)]
    assert [(t.dtype, t.elements, t.bytes) for t in bf16] == [("bfloat16", 107, 214)]
    # float16 adds one float32 per replica: the bucket's largest magnitude.
    assert [(t.dtype, t.elements, t.bytes) for t in fp16] == [
        ("float32", 1, 4),
        ("float16", 107, 214),
    ]


def test_compression_none_sums_exactly_in_float32():
    rng = np.random.RandomState(2)
    arrays = [[rng.rand(4, 4).astype("float32"), rng.rand(4, 4).astype("float32")]]
    (sums,), _ = reduce_with(resolve_compression(None), arrays)
    np.testing.assert_array_equal(sums[0], arrays[0][0] + arrays[0][1])


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_half_precision_trains_the_demo_task_as_well_as_fp32(compression):
    exact, half = demo_convnet(None), demo_convnet(compression)
    assert abs(half["accuracy"] - exact["accuracy"]) <= 0.01, (half, exact)
    stats = half["stats"]
    assert stats["compression"] == compression
    # With a compression the optimizer state stays whole ("auto"): the
    # step's uncompressed bytes are the gradients' all-reduce alone.
    gradients = exact["stats"]["all_reduce_bytes_per_step"]
    assert stats["uncompressed_bytes_per_step"] == gradients
    # Half the gradient bytes, plus fp16's one scale per bucket.
    scales = 4 * sum(b["label"].endswith("scale") for b in stats["buckets"])
    assert stats["bytes_per_step"] == gradients // 2 + scales


@pytest.mark.parametrize(
    "compression, error, fragments",
    [
        ("int8", ValueError, ["Unknown `compression`: 'int8'", "'fp16', 'bf16'"]),
        ("FP16", ValueError, ["'FP16'", "PowerSGD(rank=...)"]),
        (16, TypeError, ["compression=16", "None, 'fp16', 'bf16'"]),
    ],
)
def test_bad_compression(compression, error, fragments):
    with pytest.raises(error) as raised:
        keras_parallel.DataParallel(devices(2), compression=compression)
    for fragment in fragments:
        assert fragment in str(raised.value)
