"""Batches with fewer samples than micro-batches: a short last batch, and
fit, evaluate and predict on fewer samples than `num_microbatches`.

An empty micro-batch must never reach a kernel or a statistic (before,
BatchNormalization's moments of no sample made every weight NaN). Models
without batch statistics then equal one device; a BatchNormalization model
equals one device trained by calling it on each non-empty micro-batch, as
GPipe does (`train_in_pieces`).
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8


def mlp():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3)]
    )
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5), SCE)
    return model


def conv():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5), SCE)
    return model


def batchnorm():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.8),
            keras.layers.ReLU(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5), SCE)
    return model


MODELS = {"mlp": (mlp, (6,)), "conv": (conv, (4, 4, 2)), "batchnorm": (batchnorm, (6,))}


def data(kind: str, samples: int):
    rng = np.random.RandomState(samples)
    shape = MODELS[kind][1]
    x = rng.normal(size=(samples, *shape)).astype("float32")
    return x, rng.randint(0, 3, samples)


def pieces(batch: int, num_microbatches: int) -> list[int]:
    """GPipe's cut: the first `batch % M` pieces hold one sample more."""
    base, extra = divmod(batch, num_microbatches)
    return [base + (i < extra) for i in range(num_microbatches)]


def train_in_pieces(build, x, y, num_microbatches, epochs):
    """One device, eagerly: each batch runs as its non-empty micro-batches
    (each normalised with its own statistics), the outputs are joined, and
    Keras' loss and optimizer see the whole batch. Returns the model and the
    epoch losses as `fit`'s History gives them (batch losses weighted by
    batch size)."""
    keras.utils.set_random_seed(0)
    model = build()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for start in range(0, len(x), BATCH):
            xb, yb = x[start : start + BATCH], y[start : start + BATCH]
            with tf.GradientTape() as tape:
                outputs, offset = [], 0
                for size in pieces(len(xb), num_microbatches):
                    if size:
                        piece = xb[offset : offset + size]
                        outputs.append(model(piece, training=True))
                        offset += size
                y_pred = tf.concat(outputs, axis=0)
                loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply(grads, model.trainable_variables)
            total += float(loss) * len(xb)
        losses.append(total / len(x))
    return model, {"loss": losses}


@functools.cache
def reference(kind, samples, num_microbatches, epochs=1):
    """What PipelineParallel must give on `data(kind, samples)`: one
    device's `fit`, or for BatchNormalization the same model trained in
    GPipe's pieces. Made once per process for each case."""
    build = MODELS[kind][0]
    x, y = data(kind, samples)
    if kind == "batchnorm":
        return train_in_pieces(build, x, y, num_microbatches, epochs)
    # Without batch statistics the cut does not matter: one reference.
    return reference_fit(kind, samples, epochs)


@functools.cache
def reference_fit(kind, samples, epochs):
    x, y = data(kind, samples)
    return train(MODELS[kind][0], dict(x=x, y=y, batch_size=BATCH, epochs=epochs))


def assert_all_finite(model):
    for weight in model.get_weights():
        assert np.isfinite(weight).all()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "num_microbatches, remainder",
    [(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)],
)
def test_a_short_last_batch_equals_one_device(kind, num_microbatches, remainder):
    """samples = 2 full batches + `remainder`: the last batch has fewer
    samples than micro-batches, so pieces are empty."""
    x, y = data(kind, 2 * BATCH + remainder)
    expected, expected_history = reference(kind, len(x), num_microbatches, epochs=2)
    strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches)
    fit = dict(x=x, y=y, batch_size=BATCH, epochs=2)
    model, history = train(MODELS[kind][0], fit, strategy)
    assert_all_finite(model)
    assert max_weight_diff(model, expected) <= 1e-5
    assert max_history_diff(history, expected_history) <= 1e-5
    np.testing.assert_allclose(
        model.predict(x, batch_size=BATCH, verbose=0),
        expected.predict(x, batch_size=BATCH, verbose=0),
        atol=1e-5,
    )


def test_batch_normalization_in_pieces_differs_from_whole_batches():
    """The reference is not one device's plain `fit`: per-piece statistics
    move the weights (so the comparison above can tell them apart)."""
    x, y = data("batchnorm", 2 * BATCH + 3)
    pieces_model, _ = train_in_pieces(batchnorm, x, y, 4, epochs=1)
    whole, _ = train(batchnorm, dict(x=x, y=y, batch_size=BATCH))
    assert max_weight_diff(pieces_model, whole) > 1e-3


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("num_microbatches, samples", [(2, 1), (4, 3)])
def test_fewer_samples_than_micro_batches(kind, num_microbatches, samples):
    """`predict`, `evaluate` and `fit` on fewer samples than micro-batches
    (one batch), and a custom loop's `strategy.run` on a batch of static
    size, give one device's results."""
    x, y = data(kind, samples)
    build = MODELS[kind][0]
    single, single_history = reference(kind, samples, num_microbatches)
    strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches)
    model, history = train(build, dict(x=x, y=y, batch_size=BATCH), strategy)
    assert_all_finite(model)
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5

    expected = single.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(x[:1], verbose=0), expected[:1], atol=1e-5)
    assert (
        abs(model.evaluate(x, y, verbose=0) - single.evaluate(x, y, verbose=0)) < 1e-5
    )
    eager = strategy.run(lambda: model(x, training=False))
    np.testing.assert_allclose(eager, expected, atol=1e-5)
