"""CommunicationMonitor: the reduction's bytes in the logs."""

import logging

import keras
import numpy as np
from transparency import devices

import keras_parallel
from keras_parallel.callbacks import CommunicationMonitor

X = np.random.RandomState(0).rand(64, 4).astype("float32")
Y = np.zeros((64, 1), "float32")


def test_logs_the_bytes_the_strategy_counts():
    strategy = keras_parallel.DataParallel(devices(2), compression="bf16")
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)]
        )
        model.compile("sgd", "mse")
    history = model.fit(
        X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[CommunicationMonitor()]
    )
    stats = strategy.communication_stats()
    assert history.history["bytes_per_step"] == [stats["bytes_per_step"]] * 2
    # 15 + 4 parameters as bfloat16, in buckets: half of float32.
    assert stats["bytes_per_step"] == 2 * (4 * 3 + 3 + 3 + 1)
    assert history.history["compression_ratio"] == [0.5, 0.5]


def test_says_plainly_when_the_strategy_does_not_count(caplog):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with caplog.at_level(logging.WARNING):
        history = model.fit(X, Y, verbose=0, callbacks=[CommunicationMonitor()])
    assert "does not report its communication" in caplog.text
    assert "bytes_per_step" not in history.history
