"""Micro-batches: splitting, joining, and BatchNormalization under them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_parallel
from keras_parallel.pipeline import microbatch


@pytest.mark.parametrize(
    "batch, pieces, sizes", [(8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 2, 2]), (3, 1, [3])]
)
def test_piece_sizes(batch, pieces, sizes):
    assert microbatch.piece_sizes(tf.constant(batch), pieces).numpy().tolist() == sizes


def test_split_and_join_round_trip_nests():
    x = {"a": tf.reshape(tf.range(20.0), [10, 2]), "b": tf.range(10)}
    pieces = microbatch.split(x, 3)
    assert [p["a"].shape[0] for p in pieces] == [4, 3, 3]
    joined = microbatch.join(pieces)
    for key in x:
        np.testing.assert_array_equal(joined[key], x[key])


def test_a_static_batch_that_does_not_divide_is_refused():
    call = microbatch.microbatched(lambda x: x, 4)
    with pytest.raises(ValueError, match="batch of 6 samples does not split into"):
        call(tf.zeros([6, 2]))


def test_batch_normalization_uses_each_micro_batch_statistics():
    """Documented behaviour: under M micro-batches, BatchNormalization
    normalises each piece with its own mean and variance and updates its
    moving statistics once per piece, in order (as GPipe does)."""
    x = np.random.RandomState(0).normal(3.0, 2.0, (8, 3)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(2),
            ]
        )

    strategy = keras_parallel.PipelineParallel(["CPU:0", "CPU:1"], num_microbatches=2)
    with strategy.scope():
        model = build()
    output = strategy.run(lambda: model(x, training=True))

    plain = build()
    halves = [plain(x[:4], training=True), plain(x[4:], training=True)]
    np.testing.assert_allclose(output, np.concatenate(halves), atol=1e-5)
    momentum = 0.99
    expected = (0.0 * momentum + x[:4].mean(0) * (1 - momentum)) * momentum + x[
        4:
    ].mean(0) * (1 - momentum)
    np.testing.assert_allclose(model.layers[0].moving_mean, expected, atol=1e-6)
