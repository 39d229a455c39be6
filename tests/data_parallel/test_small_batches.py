"""Batches with fewer samples than replicas (a last-batch remainder,
`predict(x[:1])`) give one device's results: no replica with no sample
reaches a kernel, and the padding sample it computes on counts nowhere."""

import keras
import numpy as np
import pytest
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

pytestmark = pytest.mark.usefixtures("float64")

RNG = np.random.RandomState(5)
X = RNG.rand(16, 6, 6, 2)
Y = RNG.randint(0, 3, 16)
# Float64: the replicas' reordered sums move these weights by <= 2.2e-16, as
# one device does on each batch reversed.
TOLERANCE = 1e-12


def model(kind: str):
    def build():
        layers = {
            "plain": [keras.layers.Flatten(), keras.layers.Dense(4, "tanh")],
            "conv": [keras.layers.Conv2D(3, 3), keras.layers.Flatten()],
            # A Dense on 3-D inputs: its kernel's gradient loses its static
            # shape when the batch size is not known while tracing.
            "sequence": [
                keras.layers.Reshape((6, 12)),
                keras.layers.Dense(4, "tanh"),
                keras.layers.Flatten(),
            ],
            "batchnorm": [
                keras.layers.Conv2D(3, 3, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Flatten(),
            ],
        }[kind]
        net = keras.Sequential([keras.Input((6, 6, 2)), *layers, keras.layers.Dense(3)])
        net.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return net

    return build


CASES = [(n, r) for n in (2, 4) for r in range(n)]


KINDS = ["plain", "conv", "sequence", "batchnorm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("num_devices", "remainder"), CASES)
def test_fewer_samples_than_replicas(kind, num_devices, remainder):
    # Batches of n - 1 samples leave a replica empty in every step; the last
    # batch holds the remainder.
    samples = 2 * (num_devices - 1) + remainder
    fit = dict(x=X[:samples], y=Y[:samples], batch_size=num_devices - 1, epochs=2)
    reference, reference_history = train(model(kind), fit)
    strategy = keras_parallel.DataParallel(devices(num_devices))
    parallel, history = train(model(kind), fit, strategy)
    assert max_weight_diff(parallel, reference) <= TOLERANCE
    assert max_history_diff(history, reference_history) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_devices", [2, 4])
def test_predict_and_evaluate_fewer_samples_than_replicas(kind, num_devices):
    # The same initial weights (seeded) on one device and under the strategy:
    # what a replica without a sample would compute counts nowhere.
    keras.utils.set_random_seed(0)
    reference = model(kind)()
    keras.utils.set_random_seed(0)
    with keras_parallel.DataParallel(devices(num_devices)).scope():
        parallel = model(kind)()
    assert max_weight_diff(parallel, reference) == 0.0
    for size in range(1, num_devices + 1):
        np.testing.assert_allclose(
            parallel.predict(X[:size], verbose=0),
            reference.predict(X[:size], verbose=0),
            atol=TOLERANCE,
        )
        np.testing.assert_allclose(
            parallel.evaluate(X[:size], Y[:size], verbose=0),
            reference.evaluate(X[:size], Y[:size], verbose=0),
            atol=TOLERANCE,
        )
