"""All keras_parallel callbacks together, under each strategy and none."""

import contextlib

import keras
import numpy as np
import pytest
from transparency import devices

import keras_parallel
from keras_parallel import callbacks

X = np.random.RandomState(0).rand(128, 8).astype("float32")
Y = np.random.RandomState(1).rand(128, 2).astype("float32")


@pytest.mark.parametrize("strategy", ["none", "data_parallel", "model_parallel"])
def test_all_callbacks_run_and_log(strategy):
    strategy = {
        "none": None,
        "data_parallel": keras_parallel.DataParallel(devices(2)),
        "model_parallel": keras_parallel.PipelineParallel(devices(2)),
    }[strategy]
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(2)]
        )
        model.compile(keras.optimizers.SGD(0.01), "mse")
    every = [
        callbacks.ThroughputMonitor(32),
        callbacks.LinearScalingWarmup(0.01, warmup_steps=2),
        callbacks.ReplicaConsistencyCheck(every_n_steps=1),
        callbacks.DeviceMemoryMonitor(print_table=False),
        callbacks.CommunicationMonitor(),
    ]
    history = model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=every)
    logs = history.history
    assert len(logs["samples_per_second"]) == 2
    assert any(key.startswith("memory_bytes/") for key in logs)
    assert ("bytes_per_step" in logs) == isinstance(
        strategy, keras_parallel.DataParallel
    )
    replicas = strategy.num_replicas_in_sync if strategy else 1
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(
        0.01 * replicas
    )
    for callback in every:
        assert (
            type(callback)(**callback.get_config()).get_config()
            == callback.get_config()
        )
