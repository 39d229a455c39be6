"""DataParallel, PipelineParallel and MeshParallel leave the user's model,
optimizer and layers as they found them.

Reference: the same model trained on one device. After `fit`, `evaluate` and
`predict` (and after a step that fails while it is traced) every object has
its own type and the same instance attributes, of the same types, as after
single-device training; a saved model reloads under plain Keras with the
config the user gave.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import CONV_DATA, conv_batchnorm_adam
from transparency import devices

import keras_parallel
from keras_parallel._tf_internal import sublayers

# Set by Keras from the strategy in scope when the object is created.
STRATEGY_ATTRIBUTES = {"_distribute_strategy", "_distribution_strategy"}


def objects(model):
    return {
        "model": model,
        "optimizer": model.optimizer,
        **{f"layer {layer.name}": layer for layer in sublayers(model)},
    }


def attribute_types(obj) -> dict:
    return {
        name: type(value)
        for name, value in vars(obj).items()
        if name not in STRATEGY_ATTRIBUTES
    }


def as_json(config) -> str:
    return json.dumps(config, sort_keys=True)


def exercise(model):
    x, y = CONV_DATA["x"], CONV_DATA["y"]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.evaluate(x, y, batch_size=32, verbose=0)
    model.predict(x, batch_size=32, verbose=0)


def mesh_parallel():
    """A 2x2 mesh with the Dense kernels split row-wise: their calls change
    while a step is traced."""
    device_mesh = keras.distribution.DeviceMesh(
        (2, 2), ("batch", "model"), [f"cpu:{i}" for i in range(4)]
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[".*dense.*/kernel"] = ("model", None)
    return keras_parallel.MeshParallel(layout_map)


STRATEGIES = {
    "MeshParallel": mesh_parallel,
    "DataParallel": lambda: keras_parallel.DataParallel(devices(2)),
    "PipelineParallel": lambda: keras_parallel.PipelineParallel(
        devices(2), num_microbatches=2
    ),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_objects_as_after_single_device_training(strategy):
    keras.utils.set_random_seed(0)
    reference = conv_batchnorm_adam()
    exercise(reference)
    with STRATEGIES[strategy]().scope():
        model = conv_batchnorm_adam()
    before = {name: type(obj) for name, obj in objects(model).items()}
    exercise(model)
    ours, theirs = objects(model), objects(reference)
    assert {n: type(o) for n, o in ours.items()} == before
    for (name, obj), ref in zip(ours.items(), theirs.values(), strict=True):
        assert attribute_types(obj) == attribute_types(ref), name
        for attribute, value in vars(obj).items():
            if attribute in STRATEGY_ATTRIBUTES:
                continue
            assert not getattr(value, "__module__", "").startswith("keras_parallel"), (
                name,
                attribute,
            )
    assert not model.layers[1].synchronized


class FailingModel(keras.Sequential):
    def train_step(self, data):
        raise RuntimeError("the user's step failed")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_objects_restored_after_a_failing_step(strategy):
    with STRATEGIES[strategy]().scope():
        model = FailingModel(
            [
                keras.Input((4,)),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(clipnorm=1.0), loss="mse")
    optimizer_type = type(model.optimizer)
    with pytest.raises(RuntimeError, match="the user's step failed"):
        model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4, verbose=0)
    assert type(model.optimizer) is optimizer_type is keras.optimizers.SGD
    assert type(model) is FailingModel
    assert [type(layer) for layer in model.layers] == [
        keras.layers.BatchNormalization,
        keras.layers.Dense,
    ]
    assert not model.layers[0].synchronized


def test_saved_model_reloads_with_the_users_config(tmp_path):
    with keras_parallel.DataParallel(devices(2)).scope():
        keras.utils.set_random_seed(0)
        model = conv_batchnorm_adam()
    config = model.get_config()
    optimizer_config = model.optimizer.get_config()
    exercise(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Loaded outside any strategy, as a user without keras_parallel would.
    assert not tf.distribute.has_strategy()
    loaded = keras.models.load_model(path)
    # As JSON, as it is stored: Keras itself reloads tuples as lists.
    assert as_json(loaded.get_config()) == as_json(config)
    assert '"synchronized": false' in as_json(config)
    assert type(loaded.optimizer) is keras.optimizers.Adam
    assert {k: v for k, v in loaded.optimizer.get_config().items() if k != "name"} == {
        k: v for k, v in optimizer_config.items() if k != "name"
    }
    x = CONV_DATA["x"][:16]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
