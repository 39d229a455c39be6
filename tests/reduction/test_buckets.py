"""Gradient fusion into buckets."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_weight_diff, train

import keras_parallel
from keras_parallel.reduction import buckets


def test_plan_groups_consecutive_tensors_of_one_dtype_up_to_the_capacity():
    tensors = [
        tf.zeros([10]),  # 40 B
        tf.zeros([10]),  # 40 B
        tf.zeros([10], tf.float16),  # other dtype: new bucket
        tf.zeros([30]),  # 120 B
        tf.zeros([5]),  # 20 B, fits with the previous (140 <= 150)
        tf.zeros([100]),  # 400 B: larger than a bucket, alone
        tf.zeros([1]),
    ]
    assert buckets.plan(tensors, 150) == [[0, 1], [2], [3, 4], [5], [6]]


def test_pack_and_unpack_round_trip():
    tensors = [
        tf.random.normal([3, 4]),
        tf.random.normal([5]),
        tf.random.normal([2, 2, 2]),
    ]
    flat = buckets.pack(tensors)
    assert flat.shape == [12 + 5 + 8]
    for original, back in zip(tensors, buckets.unpack(flat, tensors), strict=True):
        np.testing.assert_array_equal(original, back)


def deep_mlp():
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="relu") for _ in range(40)]
        + [keras.layers.Dense(10)]
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


DATA = dict(
    x=np.random.RandomState(0).rand(256, 64).astype("float32"),
    y=np.random.RandomState(1).randint(0, 10, 256),
    batch_size=64,
)


@functools.cache
def single_device():
    return train(deep_mlp, DATA)[0]


@pytest.mark.parametrize("bucket_mb, reductions", [(1e-4, 82), (0.1, 7), (4, 1)])
def test_many_small_tensors_make_few_reductions(bucket_mb, reductions):
    # 40 kernels of 16 KiB, 40 biases of 256 B, a 2.5 KiB kernel and a bias.
    strategy = keras_parallel.DataParallel(devices(2), bucket_mb=bucket_mb)
    model, _ = train(deep_mlp, DATA, strategy)
    stats = strategy.communication_stats()
    assert stats["reductions"] == reductions
    assert stats["all_reduce_bytes_per_step"] == 4 * model.count_params()
    assert stats["compression_ratio"] == 1.0
    assert max_weight_diff(model, single_device()) <= 1e-5


@pytest.mark.parametrize("bucket_mb", [0, -1])
def test_bucket_mb_must_be_positive(bucket_mb):
    with pytest.raises(ValueError) as raised:
        keras_parallel.DataParallel(devices(2), bucket_mb=bucket_mb)
    assert "`bucket_mb` must be > 0" in str(raised.value)
    assert f"bucket_mb={bucket_mb}" in str(raised.value)
