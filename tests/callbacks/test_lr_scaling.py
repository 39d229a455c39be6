"""LinearScalingWarmup: the learning rate, step by step."""

import contextlib

import keras
import numpy as np
import pytest
from transparency import devices

import keras_parallel
from keras_parallel.callbacks import LinearScalingWarmup

X = np.random.RandomState(0).rand(64, 4).astype("float32")
Y = np.zeros((64, 1), "float32")


class RecordRate(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))


def rates(callback, strategy=None, epochs=2):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.5), "mse")
    recorder = RecordRate()
    model.fit(
        X, Y, batch_size=16, epochs=epochs, verbose=0, callbacks=[callback, recorder]
    )
    return recorder.rates


def test_ramps_to_base_lr_times_replicas_over_the_warm_up_steps():
    got = rates(
        LinearScalingWarmup(0.1, warmup_steps=4),
        keras_parallel.DataParallel(devices(4)),
    )
    # 4 replicas: 0.1 -> 0.4 over 4 steps, then 0.4.
    np.testing.assert_allclose(got, [0.1, 0.175, 0.25, 0.325] + [0.4] * 4, rtol=1e-6)


def test_warmup_epochs_use_the_steps_per_epoch():
    got = rates(
        LinearScalingWarmup(0.1, warmup_epochs=1),
        keras_parallel.DataParallel(devices(2)),
    )
    np.testing.assert_allclose(got, [0.1, 0.125, 0.15, 0.175] + [0.2] * 4, rtol=1e-6)


def test_without_a_strategy_one_replica_keeps_base_lr():
    np.testing.assert_allclose(
        rates(LinearScalingWarmup(0.1, warmup_steps=3)), [0.1] * 8, rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(base_lr=0, warmup_steps=1), "`base_lr` must be a number > 0"),
        (dict(base_lr=-1.0, warmup_steps=1), "base_lr=-1.0"),
        (dict(base_lr=0.1), "exactly one of `warmup_epochs` and `warmup_steps`"),
        (dict(base_lr=0.1, warmup_epochs=1, warmup_steps=1), "exactly one"),
        (dict(base_lr=0.1, warmup_steps=-2), "`warmup_steps` must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LinearScalingWarmup(**kwargs)
