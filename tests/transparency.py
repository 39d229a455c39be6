"""Train the same model on one device and under a strategy; compare."""

from __future__ import annotations

import functools

import keras
import numpy as np


def devices(n: int) -> list[str]:
    return [f"CPU:{i}" for i in range(n)]


def max_weight_diff(a, b) -> float:
    """Largest absolute difference between the weights of two models."""
    return max(
        float(np.max(np.abs(u - v)))
        for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
    )


def max_difference(a, b) -> float:
    """Largest absolute difference between two lists of arrays."""
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def worker_results(out, workers: int) -> list[dict]:
    """What each worker of a launched job saved in `out/worker_<i>.npz`."""
    return [dict(np.load(out / f"worker_{i}.npz")) for i in range(workers)]


def saved_weights(result: dict) -> list:
    """The weights a worker saved with `np.savez(path, *weights, ...)`."""
    count = sum(key.startswith("arr_") for key in result)
    return [result[f"arr_{i}"] for i in range(count)]


def max_history_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)


def train(build, fit_kwargs: dict, strategy=None):
    """Builds with `build()` (seeded) in `strategy`'s scope and fits.

    Returns:
        (model, history dict)
    """
    keras.utils.set_random_seed(0)
    if strategy is None:
        model = build()
    else:
        with strategy.scope():
            model = build()
    history = model.fit(verbose=0, shuffle=False, **fit_kwargs)
    return model, history.history


@functools.cache
def one_device(case: str):
    """`train` of a transparency case of `models.CASES` on one device, once
    per process: (model, history dict)."""
    from models import CASES

    build, data, _ = CASES[case]
    return train(build, data)


class StopAtEpoch(keras.callbacks.Callback):
    """Interrupts training when epoch `epoch` (0-based) begins, as a killed
    run would: `fit` raises RuntimeError("interrupted")."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")
