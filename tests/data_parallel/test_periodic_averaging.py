"""`DataParallel(sync_every=H, outer_optimizer=...)`: local SGD and DiLoCo.

The reference is the algorithm run by hand (`replicas_alone.py`): one plain
Keras model per replica on its piece of each batch, averaged every H steps.
Tolerance 1e-5: the replicas' sums of float32 changes, added in another
order than NumPy's mean, move these weights by ~1e-7 (measured).
"""

import keras
import numpy as np
import pytest
from replicas_alone import train_alone
from transparency import devices

import keras_parallel

RNG = np.random.RandomState(5)
X = RNG.rand(192, 12).astype("float32")
Y = RNG.randint(0, 4, 192)
BATCH = 32  # 6 steps an epoch


def build(optimizer, batch_norm=True):
    # No bias before BatchNormalization: its gradient is rounding noise,
    # which Adam scales up to whole steps.
    layers = [keras.Input((12,)), keras.layers.Dense(24, use_bias=not batch_norm)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.ReLU())
    model = keras.Sequential([*layers, keras.layers.Dense(4)])
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=0.05),
    "accumulation": lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
}


def outer_nesterov():
    return keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)


def fit(strategy, make_optimizer, epochs=2, batch_norm=True):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(make_optimizer(), batch_norm)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def copies(model) -> list[list[np.ndarray]]:
    """Each weight's per-device copies."""
    return [[c.numpy() for c in w.value.values] for w in model.weights]


def assert_replicas_bit_equal(model):
    for weight, values in zip(model.weights, copies(model), strict=True):
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0], err_msg=weight.path)


@pytest.mark.parametrize("outer", [False, True], ids=["local_sgd", "diloco"])
@pytest.mark.parametrize(
    "replicas, option",
    [(2, option) for option in sorted(OPTIMIZERS)] + [(4, "adam"), (4, "sgd_momentum")],
)
def test_equals_replicas_training_alone(replicas, option, outer):
    # 12 steps, synchronizing every 3 updates: after steps 3, 6, 9 and 12,
    # or with 2 steps an update, after steps 6 and 12.
    steps_between = 3 * (2 if option == "accumulation" else 1)
    strategy = keras_parallel.DataParallel(
        devices(replicas),
        sync_every=3,
        outer_optimizer=outer_nesterov() if outer else None,
    )
    model = fit(strategy, OPTIMIZERS[option])
    expected, _ = train_alone(
        build,
        OPTIMIZERS[option],
        X,
        Y,
        BATCH,
        12,
        replicas,
        steps_between,
        outer_nesterov() if outer else None,
    )
    for ours, theirs in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert_replicas_bit_equal(model)
