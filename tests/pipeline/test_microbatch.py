"""Micro-batches: splitting, joining, and BatchNormalization under them."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_history_diff, max_weight_diff, train

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


@pytest.mark.parametrize(
    "batch, calls", [(8, [2, 2, 2, 2]), (6, [2, 2, 1, 1]), (3, [1, 1, 1]), (1, [1])]
)
def test_a_static_batch_is_cut_evenly_and_empty_pieces_never_run(batch, calls):
    seen = []

    def call(x):
        seen.append(int(x.shape[0]))
        return x * 2

    x = tf.reshape(tf.range(batch * 2.0), [batch, 2])
    np.testing.assert_array_equal(microbatch.microbatched(call, 4)(x), x * 2)
    assert seen == calls


@pytest.mark.parametrize("batch", [1, 3, 6, 8])
def test_a_batch_of_unknown_size_runs_no_empty_piece(batch):
    """Traced with an unknown batch size, each piece that may be empty runs
    under a tf.cond: the call never sees zero samples, and the samples each
    call sees add up to the batch."""
    samples = tf.Variable(0)

    def call(x):
        tf.debugging.assert_positive(tf.shape(x)[0], "an empty micro-batch ran")
        samples.assign_add(tf.shape(x)[0])
        return {"double": x * 2, "sum": tf.reduce_sum(x, axis=1)}

    step = tf.function(
        microbatch.microbatched(call, 4),
        input_signature=[tf.TensorSpec([None, 2], tf.float32)],
    )
    x = tf.reshape(tf.range(batch * 2.0), [batch, 2])
    outputs = step(x)
    np.testing.assert_array_equal(outputs["double"], x * 2)
    np.testing.assert_array_equal(outputs["sum"], tf.reduce_sum(x, axis=1))
    assert int(samples.numpy()) == batch


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


def softmax_outputs():
    # float64: float32 rounding in a saturated softmax grows past 1e-5.
    keras.mixed_precision.set_global_policy("float64")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, "relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


def masked_sequences():
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras.layers.SimpleRNN(4, return_sequences=True),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.5),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


RNG = np.random.RandomState(0)
TOKENS = RNG.randint(1, 10, (33, 5))
METADATA_CASES = {
    # Saturated softmax: Keras' cross-entropy starts from the logits it
    # attaches to the output; from the probabilities it would clip them
    # (before: 2.3 from one device after 3 epochs).
    "logits": (
        softmax_outputs,
        dict(x=RNG.normal(0, 8, (33, 6)).astype("float32"), y=RNG.randint(0, 3, 33)),
    ),
    # The loss skips padded steps by the output's mask (before: 7.9e-2).
    "mask": (
        masked_sequences,
        dict(
            x=np.where(RNG.rand(33, 5) < 0.4, 0, TOKENS).astype("int32"),
            y=RNG.randint(0, 3, (33, 5)),
        ),
    ),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_masks_and_logits_reach_the_loss_as_on_one_device(case):
    """The joined output carries the pieces' Keras mask and logits, also
    from a piece that ran under a tf.cond (the last batch has 1 sample)."""
    build, data = METADATA_CASES[case]
    fit = dict(**data, batch_size=16, epochs=3)
    single, single_history = train(build, fit)
    strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches=2)
    model, history = train(build, fit, strategy)
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5


def test_losses_layers_add_leave_the_cond_weighted_by_their_piece():
    """An activity regularizer's loss from a piece run under a tf.cond is
    added to the layer outside it, weighted by the piece's share of the
    batch (zero for an empty one): together, one device's loss."""
    strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches=4)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L1(0.5))
        model = keras.Sequential([keras.Input((2,)), dense, keras.layers.Dense(1)])

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def step(x):
        return strategy.run(lambda: (model(x, training=True), model.losses))

    x = np.array([[1.0, -2.0], [0.5, 3.0]], "float32")
    _, losses = step(x)
    per_sample = 0.5 * np.abs(x @ dense.kernel.numpy() + dense.bias.numpy()).sum(1)
    assert np.isfinite(losses).all()
    # Keras divides the regularizer by the batch it sees.
    np.testing.assert_allclose(sum(losses), per_sample.mean(), rtol=1e-6)


def regularized():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(
        8,
        activation="tanh",
        activity_regularizer=keras.regularizers.L2(0.1),
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_activity_regularizers_count_as_on_one_device(float64, num_microbatches):
    # 36 samples in batches of 8: the last batch (4) is uneven for M = 4 too.
    rng = np.random.RandomState(0)
    fit = dict(x=rng.rand(36, 6), y=rng.rand(36, 1), batch_size=8, epochs=2)
    single, single_history = train(regularized, fit)
    strategy = keras_parallel.PipelineParallel(
        devices(2), num_microbatches=num_microbatches
    )
    model, history = train(regularized, fit, strategy)
    assert max_weight_diff(model, single) <= 1e-12
    assert max_history_diff(history, single_history) <= 1e-12
