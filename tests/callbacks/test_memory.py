"""DeviceMemoryMonitor: variable bytes per device on CPUs, per epoch."""

import contextlib

import keras
import numpy as np
from transparency import devices

import keras_parallel
from keras_parallel.callbacks import DeviceMemoryMonitor

X = np.random.RandomState(0).rand(64, 8).astype("float32")
Y = np.zeros((64, 2), "float32")


def fit_with_monitor(strategy=None):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)]
        )
        model.compile(keras.optimizers.Adam(), "mse")
    monitor = DeviceMemoryMonitor(print_table=False)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    return model, monitor, history.history


def test_model_parallel_splits_the_bytes_and_the_logs_show_them():
    model, monitor, history = fit_with_monitor(
        keras_parallel.PipelineParallel(devices(2))
    )
    weights = 4 * model.count_params()
    recorded = {d: values[-1] for d, values in monitor.history.items()}
    # Weights plus two Adam slots each, and Adam's two scalars.
    assert sum(recorded.values()) == 3 * weights + 8 + 4
    assert set(recorded) == {"CPU:0", "CPU:1"}
    assert history["memory_bytes/CPU:1"] == [recorded["CPU:1"]] * 2
    assert all(kind == "variables" for _, kind in monitor.measure().values())


def test_data_parallel_counts_every_copy():
    model, monitor, _ = fit_with_monitor(keras_parallel.DataParallel(devices(2)))
    weights = 4 * model.count_params()
    recorded = {d: values[-1] for d, values in monitor.history.items()}
    # Both devices hold the weights (and Adam's two scalars); the two slots
    # per weight are sharded, one copy each.
    assert sum(recorded.values()) == 2 * weights + 2 * weights + 2 * (8 + 4)
    assert min(recorded.values()) >= weights


def test_without_a_strategy_and_the_table(capsys):
    model, monitor, _ = fit_with_monitor()
    assert list(monitor.history) == ["CPU:0"]
    table = monitor.table()
    assert "CPU:0" in table and "variables" in table
