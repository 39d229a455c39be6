"""Bad input gets a clear error naming what was given and what to do."""

import keras
import numpy as np
import pytest
from conftest import run_python
from transparency import devices

import keras_parallel

X = np.random.RandomState(0).rand(64, 4).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def small():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def test_model_built_outside_the_scope_and_fit_inside():
    strategy = keras_parallel.DataParallel(devices(2))
    model = small()
    with strategy.scope(), pytest.raises(ValueError) as raised:
        model.fit(X, Y, batch_size=8, verbose=0)
    assert "was created outside `DataParallel.scope()`" in str(raised.value)
    assert "clone_model" in str(raised.value)


STRATEGIES = {
    "DataParallel": lambda: keras_parallel.DataParallel(devices(2)),
    "PipelineParallel": lambda: keras_parallel.PipelineParallel(devices(2)),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_model_built_outside_compiled_inside(optimizer, strategy):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with STRATEGIES[strategy]().scope():
        model.compile(optimizer, "mse")
    with pytest.raises(ValueError) as raised:
        model.fit(X, Y, batch_size=8, verbose=0)
    assert f"was created outside `{strategy}.scope()`" in str(raised.value)
    assert "clone_model" in str(raised.value)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("where", ["compiled outside", "instance made outside"])
def test_optimizer_made_outside_the_scope(where, strategy):
    optimizer = keras.optimizers.Adam(name="my_adam")
    with STRATEGIES[strategy]().scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        if where == "instance made outside":
            model.compile(optimizer, "mse")
    if where == "compiled outside":
        model.compile(optimizer, "mse")
    with pytest.raises(ValueError) as raised:
        model.fit(X, Y, batch_size=8, verbose=0)
    message = str(raised.value)
    assert "The optimizer 'my_adam' (Adam) was created outside" in message
    assert "model.compile(optimizer=keras.optimizers.Adam(...)" in message


@pytest.mark.parametrize("option", ["shard_optimizer", "sync_batch_norm"])
def test_options_must_be_bool(option):
    with pytest.raises(TypeError) as raised:
        keras_parallel.DataParallel(devices(2), **{option: "yes"})
    assert f"`{option}` must be True or False. Received: {option}='yes'" in str(
        raised.value
    )


def test_import_without_tensorflow():
    result = run_python(
        "import sys; sys.modules['tensorflow'] = None\nimport keras_parallel"
    )
    assert result.returncode != 0
    assert "keras_parallel needs TensorFlow" in result.stderr
    assert "keras-parallel[cpu]" in result.stderr


def test_import_with_another_keras_backend():
    result = run_python("import keras_parallel", env={"KERAS_BACKEND": "jax"})
    assert result.returncode != 0
    assert "Keras is using 'jax'" in result.stderr
    assert "KERAS_BACKEND=tensorflow" in result.stderr
