"""Training tasks on which compressed reductions are compared with exact ones.

Each run is cached: the uncompressed baseline is trained once per session.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from transparency import devices

import keras_parallel
from keras_parallel import demo


@functools.cache
def _demo_data(samples: int):
    return demo.make_data(samples, seed=1), demo.make_data(1024, seed=2)


@functools.cache
def demo_convnet(
    compression, samples: int = 4096, epochs: int = 3, sharding="auto"
) -> dict:
    """The demo's convnet and task on 2 devices (Adam, global batch 128).

    Args:
        compression: A hashable `compression` argument; PowerSGD settings are
            given as a tuple of keyword items and built here.
        sharding: The `sharding` argument.

    Returns:
        `{"accuracy": held-out accuracy, "stats": communication_stats(),
        "model": the trained model, "data": its training (x, y)}`.
    """
    (x, y), (x_test, y_test) = _demo_data(samples)
    strategy = keras_parallel.DataParallel(
        devices(2), compression=_build(compression), sharding=sharding
    )
    model = demo.train(strategy, (x, y), batch_size=128, epochs=epochs, verbose=0)
    return _result(model, strategy, (x, y), (x_test, y_test))


_CLASS_MEANS = 0.4 * np.random.RandomState(7).normal(size=(4, 64))


def _mlp_data(samples: int, seed: int):
    # Four overlapping Gaussian classes: the nearest-mean rule (Bayes optimal)
    # scores 95.5% on the held-out set, so the task is not saturated.
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 4, samples)
    return (_CLASS_MEANS[y] + rng.normal(size=(samples, 64))).astype("float32"), y


@functools.cache
def deep_mlp(compression, epochs: int = 8) -> dict:
    """A 40x64 ReLU MLP (He init), SGD with momentum, 2 devices, batch 128.

    A plain 40-layer MLP trains erratically at larger learning rates (held-out
    accuracy from 26% to 91% for lr 0.01 depending on the run's rounding), so
    the rate is small enough that every setting converges.

    Returns: as `demo_convnet`.
    """
    strategy = keras_parallel.DataParallel(devices(2), compression=_build(compression))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((64,))]
            + [
                keras.layers.Dense(64, "relu", kernel_initializer="he_normal")
                for _ in range(40)
            ]
            + [keras.layers.Dense(4)]
        )
        model.compile(
            keras.optimizers.SGD(0.003, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    x, y = _mlp_data(8192, seed=1)
    model.fit(x, y, batch_size=128, epochs=epochs, shuffle=False, verbose=0)
    return _result(model, strategy, (x, y), _mlp_data(2048, seed=2))


def _result(model, strategy, data, test_data) -> dict:
    x_test, y_test = test_data
    return {
        "accuracy": model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1],
        "stats": strategy.communication_stats(),
        "model": model,
        "data": data,
    }


def _build(compression):
    if isinstance(compression, tuple):
        return keras_parallel.PowerSGD(**dict(compression))
    return compression
