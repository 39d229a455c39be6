"""ColumnParallelDense and RowParallelDense against keras.layers.Dense."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graph_devices import short
from transparency import devices, train

import keras_parallel
from keras_parallel.layers import ColumnParallelDense, RowParallelDense

X = np.random.RandomState(0).normal(size=(6, 8)).astype("float32")


def dense(units, inputs, activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    layer = keras.layers.Dense(units, activation=activation, bias_initializer="normal")
    layer.build((None, inputs))
    return layer


def outputs_and_gradients(layers, x):
    x = tf.constant(x)
    variables = [v for layer in layers for v in layer.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for layer in layers:
            y = layer(y)
        loss = tf.reduce_sum(tf.sin(y))
    grads = tape.gradient(loss, [x] + variables)
    return y, grads[0], grads[1:]


def full_gradients(layer, grads):
    """The sharded layer's gradients assembled like the plain layer's weights."""
    kernels = grads[: len(layer.kernels)]
    rest = grads[len(layer.kernels) :]
    kernel = np.concatenate(kernels, axis=layer.split_axis)
    if isinstance(layer, ColumnParallelDense):
        return [kernel, np.concatenate(rest)] if rest else [kernel]
    return [kernel, *rest]


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("cls", [ColumnParallelDense, RowParallelDense])
def test_same_outputs_and_gradients_as_dense(cls, num_devices):
    plain = dense(12, 8, activation="tanh")
    sharded = cls.from_layer(plain, devices(num_devices))
    y, dx, grads = outputs_and_gradients([sharded], X)
    y_ref, dx_ref, grads_ref = outputs_and_gradients([plain], X)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
    for got, want in zip(full_gradients(sharded, grads), grads_ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_column_then_row_needs_one_reduction_and_equals_two_denses():
    first, second = dense(16, 8, "relu", seed=1), dense(4, 16, seed=2)
    column = ColumnParallelDense.from_layer(first, devices(4), gather_output=False)
    row = RowParallelDense.from_layer(second, devices(4), input_is_parallel=True)
    y, dx, _ = outputs_and_gradients([column, row], X)
    y_ref, dx_ref, _ = outputs_and_gradients([first, second], X)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5)

    def ops(layers):
        graph = (
            tf.function(lambda x: layers[1](layers[0](x)))
            .get_concrete_function(tf.TensorSpec([None, 8]))
            .graph
        )
        return [op.type for op in graph.get_operations()]

    pair = ops([column, row])
    # The intermediate features stay on their devices: one AddN, no gather.
    assert pair.count("AddN") == 1 and "ConcatV2" not in pair
    gathered = ops(
        [
            ColumnParallelDense.from_layer(first, devices(4)),
            RowParallelDense.from_layer(second, devices(4)),
        ]
    )
    assert gathered.count("ConcatV2") == 1 and "Split" in gathered


def test_each_device_holds_a_quarter_of_each_weight_and_of_its_slots():
    strategy = keras_parallel.PipelineParallel(devices(4))
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((8,)),
                ColumnParallelDense(32, activation="relu", gather_output=False),
                RowParallelDense(4, input_is_parallel=True, use_bias=False),
            ]
        )
        model.compile(keras.optimizers.Adam(), "mse")
    model.fit(X, np.zeros((6, 4)), verbose=0)
    column, row = model.layers
    # (8, 32) cut by columns, (32, 4) cut by rows.
    for layer, piece in ((column, (8, 8)), (row, (8, 4))):
        shapes = {short(k.value.device): tuple(k.shape) for k in layer.kernels}
        assert shapes == {f"CPU:{i}": piece for i in range(4)}
    slot_bytes = {}
    for slot in model.optimizer.variables:
        if slot.shape.rank == 2:
            device = short(slot.value.device)
            slot_bytes[device] = slot_bytes.get(device, 0) + 4 * np.prod(slot.shape)
    weights = 4 * (8 * 32 + 32 * 4)
    assert slot_bytes == {f"CPU:{i}": 2 * weights // 4 for i in range(4)}


def mlp(parallel):
    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        if parallel:
            h = ColumnParallelDense(16, activation="relu", gather_output=False)(inputs)
            outputs = RowParallelDense(3, input_is_parallel=True)(h)
        else:
            h = keras.layers.Dense(16, activation="relu")(inputs)
            outputs = keras.layers.Dense(3)(h)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        return model

    return build


DATA = dict(
    x=np.random.RandomState(1).rand(128, 8).astype("float32"),
    y=np.random.RandomState(2).rand(128, 3).astype("float32"),
    batch_size=32,
)


@pytest.mark.parametrize("strategy", [None, "model_parallel"])
def test_fit_equals_plain_dense_layers(strategy):
    if strategy:
        strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches=2)
    model, history = train(mlp(True), DATA, strategy)
    plain, plain_history = train(mlp(False), DATA)
    column, row = model.layers[1:]
    model_weights = column.full_weights() + row.full_weights()
    for got, want in zip(model_weights, plain.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(history["loss"], plain_history["loss"], atol=1e-6)


def sequential_pair():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            ColumnParallelDense(16, activation="relu", gather_output=False),
            RowParallelDense(3, input_is_parallel=True),
        ]
    )
    model.compile("sgd", "mse")
    return model


def test_saves_whole_weights_and_loads_on_another_number_of_devices(tmp_path):
    model, _ = train(sequential_pair, DATA)  # no strategy: all 4 devices
    assert len(model.layers[0].kernels) == 4
    path = str(tmp_path / "tp.keras")
    model.save(path)
    expected = model.predict(DATA["x"], verbose=0)
    with keras_parallel.PipelineParallel(devices(2)).scope():
        loaded = keras.models.load_model(path)
    assert len(loaded.layers[0].kernels) == 2
    np.testing.assert_allclose(
        loaded.predict(DATA["x"], verbose=0), expected, atol=1e-5
    )
    plain = keras.Sequential(
        [keras.Input((8,))] + [layer.to_layer() for layer in loaded.layers]
    )
    np.testing.assert_allclose(plain.predict(DATA["x"], verbose=0), expected, atol=1e-5)


def test_functional_model_with_split_features_loads_on_as_many_devices(tmp_path):
    # A Functional config records each of the column layer's output shards,
    # so it loads with the device count it was saved with.
    model, _ = train(mlp(True), DATA)
    path = str(tmp_path / "functional.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(DATA["x"], verbose=0),
        model.predict(DATA["x"], verbose=0),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "make, fragment",
    [
        (
            lambda: ColumnParallelDense(10, devices(4)),
            "`units`=10 does not split evenly over 4",
        ),
        (
            lambda: RowParallelDense(4, devices(4))(np.zeros((2, 6), "float32")),
            "`input features`=6 does not split evenly over 4",
        ),
        (
            lambda: RowParallelDense(4, devices(2), input_is_parallel=True)(
                [np.zeros((2, 2), "float32")] * 3
            ),
            "needs a list of 2 shards; received 3",
        ),
        (
            lambda: ColumnParallelDense(0),
            "`units` must be an integer >= 1. Received: units=0",
        ),
    ],
)
def test_bad_input(make, fragment):
    with pytest.raises(ValueError) as raised:
        make()
    assert fragment in str(raised.value)
