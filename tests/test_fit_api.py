"""DataParallel under the whole Keras training API, against single device."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import CONV_DATA, conv_batchnorm_adam
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

RNG = np.random.RandomState(7)
X = RNG.rand(240, 8).astype("float32")
Y = (X @ RNG.rand(8, 1)).astype("float32")


def regression(steps_per_execution: int = 1, loss="mse"):
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss,
        metrics=["mae"],
        steps_per_execution=steps_per_execution,
    )
    return model


class ArraySequence(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


INPUTS = {
    "numpy": lambda: dict(x=X, y=Y, batch_size=40),
    "tf.data": lambda: dict(x=tf.data.Dataset.from_tensor_slices((X, Y)).batch(40)),
    "PyDataset": lambda: dict(x=ArraySequence(X, Y, 40)),
}


@pytest.mark.parametrize("source", sorted(INPUTS))
def test_fit_evaluate_predict_match_single_device(source):
    reference, reference_history = train(regression, dict(INPUTS[source](), epochs=2))
    strategy = keras_parallel.DataParallel(devices(4))
    model, history = train(regression, dict(INPUTS[source](), epochs=2), strategy)
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5
    data = INPUTS[source]()
    data.pop("batch_size", None)
    kwargs = {"batch_size": 40} if source == "numpy" else {}
    np.testing.assert_allclose(
        model.evaluate(verbose=0, **data, **kwargs),
        reference.evaluate(verbose=0, **data, **kwargs),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        model.predict(X, batch_size=40, verbose=0),
        reference.predict(X, batch_size=40, verbose=0),
        atol=1e-5,
    )


@pytest.mark.parametrize("steps_per_execution", [4, 16])
def test_steps_per_execution(steps_per_execution):
    fit = dict(x=X, y=Y, batch_size=40, epochs=2)
    reference, reference_history = train(regression, fit)
    strategy = keras_parallel.DataParallel(devices(2))
    model, history = train(lambda: regression(steps_per_execution), fit, strategy)
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5


def test_uneven_batches_match_single_device():
    # 240 samples in batches of 50 on 4 replicas: pieces of 13/13/12/12, and a
    # last batch of 40. Each replica's loss is weighted by its share of the
    # batch, so the result is the single-device one.
    fit = dict(x=X, y=Y, batch_size=50, epochs=2)
    reference, reference_history = train(regression, fit)
    strategy = keras_parallel.DataParallel(devices(4))
    model, history = train(regression, fit, strategy)
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5
    predictions = model.predict(X[:7], batch_size=5, verbose=0)  # 5, then 2 < 4
    np.testing.assert_allclose(
        predictions, reference.predict(X[:7], batch_size=5, verbose=0), atol=1e-5
    )


def test_uneven_batches_with_a_replica_left_empty():
    # 240 samples in batches of 34 on 4 replicas: 9/9/8/8, and a last batch of
    # 2 that leaves two replicas without samples.
    fit = dict(x=X, y=Y, batch_size=34, epochs=2)
    reference, reference_history = train(regression, fit)
    strategy = keras_parallel.DataParallel(devices(4))
    model, history = train(regression, fit, strategy)
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5


def test_uneven_batches_with_batchnorm():
    # 128 samples in batches of 41 on 4 replicas: 11/10/10/10, and a last
    # batch of 5: 2/1/1/1. Global statistics and weighted losses keep it exact.
    fit = dict(CONV_DATA, batch_size=41)
    reference, reference_history = train(conv_batchnorm_adam, fit)
    strategy = keras_parallel.DataParallel(devices(4))
    model, history = train(conv_batchnorm_adam, fit, strategy)
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5


def test_iterator_traced_once_across_epochs():
    # Keras wraps the step in a tf.function taking the iterator: the trace of
    # the first epoch serves every later epoch's new iterator. The loss runs
    # its Python only while the step is traced.
    traces = []

    def counted_mse(y_true, y_pred):
        traces.append(None)
        return keras.losses.mean_squared_error(y_true, y_pred)

    strategy = keras_parallel.DataParallel(devices(2))
    model, _ = train(
        lambda: regression(loss=counted_mse), dict(x=X, y=Y, batch_size=40), strategy
    )
    first_epoch = len(traces)
    assert first_epoch > 0
    model.fit(X, Y, batch_size=40, epochs=3, verbose=0)
    model.fit(X, Y, batch_size=40, epochs=2, verbose=0)
    assert len(traces) == first_epoch


def test_recreate_with_differently_shaped_models():
    # MirroredStrategy fails here with "Shape mismatch in the collective
    # instance" (tensorflow/tensorflow#62790).
    for width in range(1, 11):
        strategy = keras_parallel.DataParallel(devices(2))
        with strategy.scope():
            keras.utils.set_random_seed(width)
            model = keras.Sequential(
                [keras.Input((8,)), keras.layers.Dense(width), keras.layers.Dense(1)]
            )
            model.compile(keras.optimizers.SGD(0.01), "mse")
        before = model.get_weights()
        history = model.fit(X, Y, batch_size=40, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert any(
            not np.array_equal(a, b)
            for a, b in zip(before, model.get_weights(), strict=True)
        )


@pytest.mark.parametrize("num_devices", [2, 4])
def test_on_batch_api_splits_the_batch(num_devices):
    # keras.io's older GAN loops call these; each replica takes its piece of
    # the batch, as in `fit`, also for batches smaller than the replicas.
    keras.utils.set_random_seed(0)
    reference = regression()
    keras.utils.set_random_seed(0)
    with keras_parallel.DataParallel(devices(num_devices)).scope():
        model = regression()
    for size in (40, 7, 1):
        model.reset_metrics()  # Keras 3.14 keeps them across calls
        reference.reset_metrics()
        np.testing.assert_allclose(
            model.train_on_batch(X[:size], Y[:size]),
            reference.train_on_batch(X[:size], Y[:size]),
            atol=1e-6,
        )
        # Keras' loss tracker counts the samples the replicas computed on.
        count = {v.name: v for v in model.metrics[0].variables}["count"]
        assert float(count.numpy()) == size
    assert max_weight_diff(model, reference) <= 1e-6
    for size in (40, 3):
        np.testing.assert_allclose(
            model.test_on_batch(X[:size], Y[:size]),
            reference.test_on_batch(X[:size], Y[:size]),
            atol=1e-6,
        )
        predictions = model.predict_on_batch(X[:size])
        assert predictions.shape == (size, 1)
        np.testing.assert_allclose(
            predictions, reference.predict_on_batch(X[:size]), atol=1e-6
        )
