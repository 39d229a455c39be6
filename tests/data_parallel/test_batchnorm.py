"""BatchNormalization statistics over the global batch, or per replica."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graph_devices import traced_train_step
from models import CONV_DATA, conv_batchnorm_adam
from transparency import devices, max_weight_diff, train

import keras_parallel
from keras_parallel.data_parallel import batchnorm


def test_global_statistics_by_default_per_replica_on_request():
    reference, _ = train(conv_batchnorm_adam, CONV_DATA)
    synced, _ = train(
        conv_batchnorm_adam, CONV_DATA, keras_parallel.DataParallel(devices(4))
    )
    local, _ = train(
        conv_batchnorm_adam,
        CONV_DATA,
        keras_parallel.DataParallel(devices(4), sync_batch_norm=False),
    )
    # The user's layer config is left as given (Keras saves `synchronized`).
    assert not synced.layers[1].synchronized and not local.layers[1].synchronized
    assert max_weight_diff(synced, reference) <= 1e-5
    # Per-replica statistics over 8 samples instead of 32 change the numbers.
    assert max_weight_diff(local, reference) > 1e-3


def replica_moments(strategy, x, moments):
    """`moments(piece)` in every replica, each holding its piece of `x`."""
    pieces = np.split(x, strategy.num_replicas_in_sync)
    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(pieces[context.replica_id_in_sync_group])
    )
    mean, variance = strategy.run(moments, args=(values,))
    return (
        strategy.experimental_local_results(mean)[0].numpy(),
        strategy.experimental_local_results(variance)[0].numpy(),
    )


def test_moments_keep_their_digits_when_the_mean_is_large():
    rng = np.random.RandomState(0)
    x = (1000.0 + 0.01 * rng.randn(64, 3)).astype("float32")
    exact_mean = x.astype("float64").mean(0)
    exact_variance = x.astype("float64").var(0)
    strategy = keras_parallel.DataParallel(devices(4))
    mean, variance = replica_moments(
        strategy, x, lambda piece: batchnorm.global_moments(piece, [0])
    )
    _, keras_variance = replica_moments(
        strategy,
        x,
        lambda piece: keras.ops.moments(piece, axes=[0], synchronized=True),
    )
    _, one_device_variance = tf.nn.moments(tf.constant(x), [0])

    def error(v):
        return np.max(np.abs(v - exact_variance) / exact_variance)

    np.testing.assert_allclose(mean, exact_mean, rtol=1e-6)
    # As accurate as one device's moments of the whole batch; E[x²]−E[x]²
    # cancels 1e6 against 1e-4 and keeps no digit.
    assert error(variance) <= max(2 * error(one_device_variance.numpy()), 1e-5)
    assert error(keras_variance) > 1e-1


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_gradient_is_one_devices_with_every_replicas_loss(masked):
    """Each replica's loss uses the global mean and variance with its own
    coefficients; the gradient every replica gets for its piece is that of
    one device's moments of the whole batch under the summed loss."""
    rng = np.random.RandomState(2)
    x = rng.randn(16, 5, 3) + 4.0
    weights = (rng.rand(16, 5, 1) < 0.7) * np.ones((1, 1, 3)) if masked else None
    coefficients = rng.randn(4, 2, 3)
    strategy = keras_parallel.DataParallel(devices(4))

    def per_replica(value):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(
                np.split(value, 4)[context.replica_id_in_sync_group]
            )
        )

    def replica_gradient(piece, piece_weights, replica_coefficients):
        with tf.GradientTape() as tape:
            tape.watch(piece)
            mean, variance = batchnorm.global_moments(piece, [0, 1], piece_weights)
            # This replica's row of `coefficients`: (1, 2, channels).
            loss = tf.reduce_sum(replica_coefficients[0, 0] * mean) + tf.reduce_sum(
                replica_coefficients[0, 1] * variance
            )
        return tape.gradient(loss, piece)

    gradients = strategy.run(
        replica_gradient,
        args=(
            per_replica(x),
            None if weights is None else per_replica(weights),
            per_replica(coefficients),
        ),
    )
    gradient = np.concatenate(
        [g.numpy() for g in strategy.experimental_local_results(gradients)]
    )

    whole = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(whole)
        if masked:
            mean, variance = tf.nn.weighted_moments(whole, [0, 1], weights)
        else:
            mean, variance = tf.nn.moments(whole, [0, 1])
        summed = coefficients.sum(0)
        loss = tf.reduce_sum(summed[0] * mean) + tf.reduce_sum(summed[1] * variance)
    np.testing.assert_allclose(gradient, tape.gradient(loss, whole), atol=1e-12)


def masked_batch_norm():
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4, mask_zero=True),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_masked_statistics_are_global():
    # Keras' own synchronized moments skip masked inputs (each replica then
    # normalises with its own piece's statistics).
    rng = np.random.RandomState(1)
    x = rng.randint(1, 20, (64, 6))
    x[:, 4:][rng.rand(64, 2) < 0.5] = 0
    data = dict(x=x, y=rng.randint(0, 2, 64), batch_size=32, epochs=2)
    reference, _ = train(masked_batch_norm, data)
    model, _ = train(masked_batch_norm, data, keras_parallel.DataParallel(devices(4)))
    assert max_weight_diff(model, reference) <= 1e-5


def test_rows_are_merged_once_per_layer_not_in_every_replica():
    # The merge reads the gathered rows (count, mean, residual, squares):
    # one unstack of 4 per layer, however many replicas (a merge in every
    # replica would be traced and optimized 4 times here).
    strategy = keras_parallel.DataParallel(devices(4))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = conv_batchnorm_adam()
    x, y = CONV_DATA["x"][:32], CONV_DATA["y"][:32]
    model.train_on_batch(x, y)  # makes the metrics' and optimizer's variables
    nodes, _ = traced_train_step(model, strategy, x, y)
    merges = [n for n in nodes if n.op == "Unpack" and n.attr["num"].i == 4]
    assert len(merges) == 1
