"""ThroughputMonitor: samples/s and step time in the logs, warm-up excluded,
timed by a clock the test advances step by step."""

import contextlib

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


class StepClock(keras.callbacks.Callback):
    """A clock that `fit` advances: each step (or group of steps with
    `steps_per_execution`) takes `seconds[batch]`, or `default`."""

    def __init__(self, seconds: dict, default: float):
        super().__init__()
        self.seconds, self.default, self.now = seconds, default, 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_begin(self, batch, logs=None):
        self.now += self.seconds.get(batch, self.default)


@pytest.mark.parametrize("strategy", [None, "data_parallel"])
def test_warm_up_steps_are_not_timed(strategy):
    strategy = keras_parallel.DataParallel(devices(2)) if strategy else None
    runs = {}
    for warmup in (0, 2):
        model = build(strategy)
        # 8 steps per epoch: two of 250 ms, then six of 10 ms.
        clock = StepClock({0: 0.25, 1: 0.25}, default=0.01)
        history = model.fit(
            X,
            Y,
            batch_size=32,
            epochs=2,
            verbose=0,
            callbacks=[clock, ThroughputMonitor(32, warmup_steps=warmup, clock=clock)],
        )
        runs[warmup] = history.history
    assert runs[0]["step_time_ms"] == pytest.approx([1000 * 0.56 / 8] * 2)
    assert runs[0]["samples_per_second"] == pytest.approx([8 * 32 / 0.56] * 2)
    assert runs[2]["step_time_ms"] == pytest.approx([10.0] * 2)
    assert runs[2]["samples_per_second"] == pytest.approx([3200.0] * 2)


def test_steps_per_execution_counts_every_step():
    # Keras reports once per 4 steps; each report is 4 steps of 10 ms.
    model = build(steps_per_execution=4)
    clock = StepClock({}, default=0.04)
    history = model.fit(
        X,
        Y,
        batch_size=32,
        epochs=1,
        verbose=0,
        callbacks=[clock, ThroughputMonitor(32, 4, clock=clock)],
    )
    assert history.history["step_time_ms"] == pytest.approx([10.0])
    assert history.history["samples_per_second"] == pytest.approx([3200.0])


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
