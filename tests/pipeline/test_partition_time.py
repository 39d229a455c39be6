"""PipelineParallel(partition="time"): stages balanced by each layer's
measured forward and backward time, against the byte balance of "auto",
training on one device, and the model's state before placement.

No assertion reads a time: the models' costs differ by a factor of 100 or
more, so the placement they lead to does not depend on timing noise."""

import keras
import numpy as np
import pytest
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def conv_then_dense():
    """A convolution with a quarter of the bytes and ~200 times the
    multiplications of the Dense layers after it (per sample 10.6M
    multiply-adds against 52K)."""
    model = keras.Sequential(
        [
            keras.Input((24, 24, 128)),
            keras.layers.Conv2D(16, 3, padding="same", name="conv"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(128, "relu", name="dense_0"),
            keras.layers.Dense(128, "relu", name="dense_1"),
            keras.layers.Dense(128, "relu", name="dense_2"),
            keras.layers.Dense(128, "relu", name="dense_3"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    model.compile(keras.optimizers.Adam(), SCE)
    return model


def stage_devices(model) -> dict[str, str]:
    """Layer name -> the device `placement_report` gives its weights."""
    return {
        row.layer: row.device
        for row in keras_parallel.placement_report(model).layers
        if row.device is not None
    }


@pytest.mark.parametrize(
    "partition, first_stage",
    [
        # Bytes: conv 74 KB, dense_0 9 KB, dense_1..3 66 KB each, head 5 KB.
        ("auto", ["conv", "dense_0", "dense_1"]),
        # Time: the convolution outweighs all the rest together.
        ("time", ["conv"]),
    ],
)
def test_time_puts_the_costly_layer_alone_where_bytes_would_not(partition, first_stage):
    strategy = keras_parallel.PipelineParallel(devices(2), partition=partition)
    with strategy.scope():
        model = conv_then_dense()
    placed = stage_devices(model)
    expected = {
        name: "CPU:0" if name in first_stage else "CPU:1"
        for name in ["conv", "dense_0", "dense_1", "dense_2", "dense_3", "head"]
    }
    assert placed == expected


def mlp_with_state():
    """Seeded Dropout and BatchNormalization: their seed states and moving
    statistics are what measuring in training mode would move."""
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, "relu"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(256, "relu"),
            keras.layers.Dense(256, "relu"),
            keras.layers.Dense(32, "relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), SCE, metrics=["accuracy"])
    return model


RNG = np.random.RandomState(0)
DATA = dict(
    x=RNG.rand(256, 16).astype("float32"),
    y=RNG.randint(0, 3, 256),
    batch_size=32,
    epochs=2,
)


@pytest.mark.parametrize("num_devices", [2, 3])
def test_training_equals_one_device(num_devices):
    strategy = keras_parallel.PipelineParallel(devices(num_devices), partition="time")
    model, history = train(mlp_with_state, DATA, strategy)
    single, single_history = train(mlp_with_state, DATA)
    assert len(set(stage_devices(model).values())) == num_devices
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5


def model_with_every_kind_of_state():
    """BatchNormalization's moving statistics, seed generators (an unseeded
    Dropout and GaussianNoise), an activity regularizer's loss."""
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, "relu", activity_regularizer="l2"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.GaussianNoise(0.3),
            keras.layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.Adam(), SCE)
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("placed_by", ["place", "predict"])
def test_measuring_leaves_model_and_optimizer_variables_bit_identical(placed_by):
    """Placed eagerly (`strategy.place`) or while Keras traces the first
    predict step (which changes no variable itself)."""
    strategy = keras_parallel.PipelineParallel(devices(2), partition="time")
    with strategy.scope():
        model = model_with_every_kind_of_state()
    variables = [*model.variables, *model.optimizer.variables]
    before = [v.numpy().copy() for v in variables]
    classes = [type(layer) for layer in model.layers]
    if placed_by == "place":
        strategy.place(model)
    else:
        model.predict(DATA["x"][:64], batch_size=32, verbose=0)
    assert len(set(stage_devices(model).values())) == 2
    after = [*model.variables, *model.optimizer.variables]
    assert [id(v) for v in after] == [id(v) for v in variables]
    for variable, value in zip(variables, before, strict=True):
        assert variable.numpy().dtype == value.dtype
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    assert [type(layer) for layer in model.layers] == classes


def test_functional_model_with_token_and_dict_inputs():
    """Integer inputs get valid ids (0), a dict of inputs keeps its keys."""

    def build():
        tokens = keras.Input((6,), dtype="int32", name="tokens")
        extra = keras.Input((4,), name="extra")
        embedded = keras.layers.Embedding(50, 8, name="embed")(tokens)
        pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
        joined = keras.layers.Concatenate(name="join")([pooled, extra])
        hidden = keras.layers.Dense(256, "relu", name="hidden")(joined)
        model = keras.Model(
            {"tokens": tokens, "extra": extra},
            keras.layers.Dense(3, name="head")(hidden),
        )
        model.compile(keras.optimizers.Adam(1e-2), SCE)
        return model

    data = dict(
        x={
            "tokens": RNG.randint(0, 50, (128, 6)),
            "extra": RNG.rand(128, 4).astype("float32"),
        },
        y=RNG.randint(0, 3, 128),
        batch_size=32,
    )
    strategy = keras_parallel.PipelineParallel(devices(2), partition="time")
    model, _ = train(build, data, strategy)
    single, _ = train(build, data)
    assert len(set(stage_devices(model).values())) == 2
    assert max_weight_diff(model, single) <= 1e-5


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, "relu")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def test_subclassed_model_is_refused_with_the_alternatives():
    strategy = keras_parallel.PipelineParallel(devices(2), partition="time")
    with strategy.scope():
        model = Subclassed()
        model.compile("sgd", SCE)
    with pytest.raises(ValueError) as error:
        model.fit(DATA["x"], DATA["y"], batch_size=32, verbose=0)
    for part in ["partition='time'", "Functional or Sequential", "partition='auto'"]:
        assert part in str(error.value)


def test_misspelled_partition_lists_the_accepted_values():
    with pytest.raises(ValueError) as error:
        keras_parallel.PipelineParallel(devices(2), partition="times")
    assert str(error.value) == (
        "`partition` must be 'auto', 'time', a list of positive stage sizes "
        "(one per device), or a dict from layer name to device. Received: "
        "partition='times'"
    )
