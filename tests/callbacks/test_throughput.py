"""ThroughputMonitor: samples/s and step time in the logs, warm-up excluded."""

import contextlib
import time

import keras
import numpy as np
import pytest
from transparency import devices

import keras_parallel
from keras_parallel.callbacks import ThroughputMonitor

X = np.random.RandomState(0).rand(256, 8).astype("float32")
Y = np.random.RandomState(1).rand(256, 1).astype("float32")


def build(strategy=None, steps_per_execution=1):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse", steps_per_execution=steps_per_execution)
    return model


class SlowStart(keras.callbacks.Callback):
    """Sleeps before the first two steps of each epoch."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch < 2:
            time.sleep(0.25)


@pytest.mark.parametrize("strategy", [None, "data_parallel"])
def test_warm_up_steps_are_not_timed(strategy):
    strategy = keras_parallel.DataParallel(devices(2)) if strategy else None
    runs = {}
    for warmup in (0, 2):
        model = build(strategy)
        history = model.fit(
            X,
            Y,
            batch_size=32,
            epochs=2,
            verbose=0,
            callbacks=[SlowStart(), ThroughputMonitor(32, warmup_steps=warmup)],
        )
        runs[warmup] = history.history
    # 8 steps per epoch; with no warm-up the two sleeps are in the figure.
    assert min(runs[0]["step_time_ms"]) >= 500 / 8
    assert max(runs[2]["step_time_ms"]) < 500 / 8
    for logs in runs.values():
        for rate, ms in zip(
            logs["samples_per_second"], logs["step_time_ms"], strict=True
        ):
            assert rate * ms / 1000 == pytest.approx(32)


def test_steps_per_execution_counts_every_step():
    model = build(steps_per_execution=4)
    history = model.fit(
        X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[ThroughputMonitor(32, 4)]
    )
    (rate,), (ms,) = (
        history.history["samples_per_second"],
        history.history["step_time_ms"],
    )
    assert rate * ms / 1000 == pytest.approx(32)


def test_an_epoch_within_the_warm_up_reports_nothing():
    history = build().fit(
        X[:64], Y[:64], batch_size=32, verbose=0, callbacks=[ThroughputMonitor(32, 5)]
    )
    assert "samples_per_second" not in history.history


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(batch_size=0), "`batch_size` must be an integer >= 1"),
        (dict(batch_size=32, warmup_steps=-1), "warmup_steps=-1"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ThroughputMonitor(**kwargs)


def test_config():
    assert ThroughputMonitor(64, 3).get_config() == {
        "batch_size": 64,
        "warmup_steps": 3,
    }
