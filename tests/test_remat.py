"""A model built under `keras.RematScope` trains as on one device under every
strategy (its memory saving: `benchmarks/remat.py`).

Only `mode="activations"` runs on Keras' TensorFlow backend in a traced step:
the modes that recompute whole layer calls pass keyword arguments to
`tf.recompute_grad`, which TensorFlow refuses outside eager execution, on one
device as under any strategy (Keras 3.15, TensorFlow 2.21)."""

import keras
import numpy as np
import pytest
from transparency import devices, max_weight_diff

import keras_parallel

RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(48, 16)), RNG.normal(size=(48, 4))


def mesh():
    layout_map = keras.distribution.LayoutMap(
        keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices(4))
    )
    layout_map[".*wide.*/kernel"] = (None, "model")
    return keras_parallel.MeshParallel(layout_map)


STRATEGIES = {
    "DataParallel": lambda: keras_parallel.DataParallel(devices(2)),
    "PipelineParallel": lambda: keras_parallel.PipelineParallel(devices(2), 2),
    "PipelineParallel-1f1b": lambda: keras_parallel.PipelineParallel(
        devices(2), 2, schedule="1f1b", recompute="auto"
    ),
    "MeshParallel": mesh,
}


def build(remat: bool):
    def make():
        inputs = keras.Input((16,))
        with keras.RematScope(mode="activations" if remat else None):
            hidden = keras.layers.Dense(32, activation="gelu", name="wide")(inputs)
            hidden = keras.layers.Dense(32, activation="gelu", name="wider")(hidden)
        model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return model

    return make


def fit(make, strategy=None):
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else keras.utils.CustomObjectScope({}):
        model = make()
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return model, history.history["loss"]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_remat_model_equals_one_device(strategy, float64):
    reference, reference_loss = fit(build(remat=True))
    model, loss = fit(build(remat=True), STRATEGIES[strategy]())
    assert max_weight_diff(model, reference) <= 1e-12
    np.testing.assert_allclose(loss, reference_loss, atol=1e-12)
    # The scope changed only what is kept, not the numbers.
    plain, _ = fit(build(remat=False))
    assert max_weight_diff(plain, reference) <= 1e-12
