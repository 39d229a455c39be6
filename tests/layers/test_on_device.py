"""OnDevice: one layer pinned to a device, outside and inside PipelineParallel."""

import keras
import numpy as np
import tensorflow as tf
from graph_devices import short, traced_train_step
from transparency import devices, max_weight_diff, train

import keras_parallel
from keras_parallel.layers import OnDevice

RNG = np.random.RandomState(0)
DATA = dict(x=RNG.rand(128, 8).astype("float32"), y=RNG.rand(128, 2), batch_size=32)


def build(pinned=True):
    def wrap(layer, device):
        return OnDevice(layer, device) if pinned else layer

    model = keras.Sequential(
        [
            keras.Input((8,)),
            wrap(keras.layers.Dense(16, "relu"), "CPU:1"),
            wrap(keras.layers.Dense(16, "relu"), "CPU:2"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def test_outside_a_strategy_weights_forward_and_backward_are_placed():
    model, history = train(build, DATA)
    plain, plain_history = train(lambda: build(pinned=False), DATA)
    assert max_weight_diff(model, plain) <= 1e-5
    np.testing.assert_allclose(history["loss"], plain_history["loss"], atol=1e-6)
    assert [short(layer.variables[0].value.device) for layer in model.layers] == [
        "CPU:1",
        "CPU:2",
        "CPU:0",
    ]
    nodes, _ = traced_train_step(
        model, tf.distribute.get_strategy(), DATA["x"][:32], DATA["y"][:32]
    )
    placed = {}
    for node in nodes:
        if node.op in ("MatMul", "ReluGrad", "BiasAddGrad"):
            placed.setdefault(node.op, set()).add(short(node.device))
    # Forward and gradient ops of the pinned layers carry their devices.
    assert {"CPU:1", "CPU:2"} <= placed["ReluGrad"]
    assert {"CPU:1", "CPU:2"} <= placed["BiasAddGrad"]


def test_inside_model_parallel_the_pin_wins_and_slots_follow():
    # The pinned layer belongs to no stage: three stages for the other three.
    strategy = keras_parallel.PipelineParallel(devices(3), partition=[1, 1, 1])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16),
                OnDevice(keras.layers.Dense(16), "CPU:3"),
                keras.layers.Dense(16),
                keras.layers.Dense(2),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(DATA["x"], DATA["y"], batch_size=32, verbose=0)
    assert [short(layer.variables[0].value.device) for layer in model.layers] == [
        "CPU:0",
        "CPU:3",
        "CPU:1",
        "CPU:2",
    ]
    pinned = model.layers[1].variables[0]
    prefix = f"{model.optimizer.name}/{pinned.path.replace('/', '_')}_"
    slots = [s for s in model.optimizer.variables if s.path.startswith(prefix)]
    assert len(slots) == 2
    assert {short(s.value.device) for s in slots} == {"CPU:3"}


def test_saves_and_loads(tmp_path):
    model, _ = train(build, DATA)
    path = str(tmp_path / "pinned.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[0], OnDevice)
    assert loaded.layers[1].get_config()["device"] == "CPU:2"
    np.testing.assert_allclose(
        loaded.predict(DATA["x"], verbose=0), model.predict(DATA["x"], verbose=0)
    )
    assert short(loaded.layers[1].variables[0].value.device) == "CPU:2"


def test_bad_arguments():
    import pytest

    with pytest.raises(TypeError, match="`layer` must be a keras.layers.Layer"):
        OnDevice("dense", "CPU:0")
    with pytest.raises(ValueError, match="CPU:9"):
        OnDevice(keras.layers.Dense(2), "CPU:9")
