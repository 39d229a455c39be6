"""PipelineParallel: transparency against one device, placement of weights,
slots and ops, saving, and bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graph_devices import short, traced_train_step, variable_writes
from test_functional_graphs import Reversed
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(optimizer=lambda: keras.optimizers.SGD(0.05, momentum=0.9)):
    def build():
        model = keras.Sequential(
            [keras.Input((16,))]
            + [keras.layers.Dense(32, "relu") for _ in range(5)]
            + [keras.layers.Dense(3)]
        )
        model.compile(optimizer(), SCE, metrics=["accuracy"])
        return model

    return build


def functional_with_skip():
    inputs = keras.Input((16,))
    a = keras.layers.Dense(32, "relu")(inputs)
    b = keras.layers.Dense(32, "tanh")(a)
    c = keras.layers.Add()([a, b])
    d = keras.layers.Dense(32, "relu")(c)
    outputs = keras.layers.Dense(3)(d)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), SCE, metrics=["accuracy"])
    return model


class Tower(keras.Model):
    """A subclassed model whose sublayers run in the order they are made."""

    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(50, 8)
        self.lstm = keras.layers.LSTM(16)
        self.hidden = keras.layers.Dense(16, "relu")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(self.lstm(self.embed(x))))


def subclassed():
    model = Tower()
    model.compile(keras.optimizers.AdamW(1e-2), SCE, metrics=["accuracy"])
    return model


RNG = np.random.RandomState(0)
DENSE_DATA = dict(
    x=RNG.rand(256, 16).astype("float32"), y=RNG.randint(0, 3, 256), batch_size=32
)
TOKEN_DATA = dict(
    x=RNG.randint(0, 50, (128, 6)), y=RNG.randint(0, 3, 128), batch_size=32
)

MODELS = {
    "sequential_sgd_momentum": (mlp(), DENSE_DATA),
    "functional_adam": (functional_with_skip, DENSE_DATA),
    "subclassed_lstm_adamw": (subclassed, TOKEN_DATA),
}


@pytest.mark.parametrize("num_microbatches", [1, 4])
@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_training_equals_one_device(name, num_devices, num_microbatches):
    build, data = MODELS[name]
    single, single_history = train(build, data)
    strategy = keras_parallel.PipelineParallel(
        devices(num_devices), num_microbatches=num_microbatches
    )
    model, history = train(build, data, strategy)
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5
    stages = {short(v.value.device) for v in model.trainable_variables}
    assert stages == {f"CPU:{i}" for i in range(num_devices)}
    x = data["x"][:64]
    np.testing.assert_allclose(
        model.predict(x, verbose=0), single.predict(x, verbose=0), atol=1e-5
    )
    assert (
        max_history_diff(
            {"eval": model.evaluate(x, data["y"][:64], verbose=0)},
            {"eval": single.evaluate(x, data["y"][:64], verbose=0)},
        )
        <= 1e-5
    )


@pytest.mark.parametrize("name", MODELS)
def test_1f1b_with_recomputation_equals_one_device(name):
    build, data = MODELS[name]
    single, single_history = train(build, data)
    strategy = keras_parallel.PipelineParallel(
        devices(2), num_microbatches=4, schedule="1f1b", recompute=True
    )
    model, history = train(build, data, strategy)
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5


def adam_mlp():
    return mlp(lambda: keras.optimizers.Adam(1e-2))()


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_weights_slots_and_ops_live_on_the_stage_device(num_microbatches):
    strategy = keras_parallel.PipelineParallel(devices(4), num_microbatches)
    model, _ = train(adam_mlp, {**DENSE_DATA, "epochs": 1}, strategy)
    layer_device = {}
    for layer in model.layers:
        (device,) = {short(v.value.device) for v in layer.variables}
        layer_device[layer.name] = device
    assert sorted(set(layer_device.values())) == ["CPU:0", "CPU:1", "CPU:2", "CPU:3"]

    # Adam's two slots per weight sit with the weight (plain tf.device
    # placement leaves them all on the first device).
    optimizer = model.optimizer
    for variable in model.trainable_variables:
        prefix = f"{optimizer.name}/{variable.path.replace('/', '_')}_"
        slots = [s for s in optimizer.variables if s.path.startswith(prefix)]
        assert len(slots) == 2, (variable.path, [s.path for s in slots])
        for slot in slots:
            assert slot.value.device == variable.value.device, slot.path

    nodes, captured = traced_train_step(
        model, strategy, DENSE_DATA["x"][:32], DENSE_DATA["y"][:32]
    )
    # Every optimizer update runs on the device of the variable it writes.
    writes = variable_writes(nodes, captured)
    assert len(writes) >= 3 * len(model.trainable_variables)
    for path, device in writes:
        variable = next(
            v
            for v in list(model.variables) + list(model.optimizer.variables)
            if v.path == path
        )
        assert device == short(variable.value.device), path
    # Forward and backward: every MatMul, BiasAdd(Grad), Relu(Grad) carries
    # a device, and each stage runs both passes of its own layers.
    kinds = {"MatMul", "BiasAdd", "BiasAddGrad", "Relu", "ReluGrad"}
    placed = {}
    for node in nodes:
        if node.op in kinds:
            assert node.device, node.name
            placed.setdefault(short(node.device), set()).add(node.op)
    assert placed == {device: kinds for device in layer_device.values()}


@pytest.mark.parametrize(
    "partition, expected",
    [
        ([1, 1, 4], ["CPU:0", "CPU:1", "CPU:2", "CPU:2", "CPU:2", "CPU:2"]),
        (
            {"dense_b": "CPU:1", "dense_e": "/device:CPU:2"},
            ["CPU:0", "CPU:1", "CPU:1", "CPU:1", "CPU:2", "CPU:2"],
        ),
    ],
)
def test_explicit_partitions(partition, expected):
    def build():
        model = keras.Sequential(
            [keras.Input((16,))]
            + [keras.layers.Dense(8, name=f"dense_{c}") for c in "abcdef"]
        )
        model.compile("sgd", "mse")
        return model

    strategy = keras_parallel.PipelineParallel(devices(3), partition=partition)
    data = dict(x=DENSE_DATA["x"][:64], y=np.zeros((64, 8)), batch_size=32)
    model, history = train(build, data, strategy)
    assert [short(layer.kernel.value.device) for layer in model.layers] == expected
    single, single_history = train(build, data)
    assert max_weight_diff(model, single) <= 1e-5


def test_saved_model_loads_on_one_device_and_repartitioned(tmp_path):
    strategy = keras_parallel.PipelineParallel(devices(4), num_microbatches=2)
    model, _ = train(adam_mlp, DENSE_DATA, strategy)
    path = str(tmp_path / "model.keras")
    model.save(path)
    x = DENSE_DATA["x"][:64]
    expected = model.predict(x, verbose=0)

    plain = keras.models.load_model(path)
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, atol=1e-6)
    assert {short(v.value.device) for v in plain.variables} == {"CPU:0"}

    again = keras_parallel.PipelineParallel(devices(2))
    with again.scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert {short(v.value.device) for v in loaded.trainable_variables} == {
        "CPU:0",
        "CPU:1",
    }
    loaded.fit(DENSE_DATA["x"], DENSE_DATA["y"], batch_size=32, verbose=0)
    # Optimizer state restored from the file moved with its weights too.
    for slot in loaded.optimizer.variables:
        if slot.shape.rank == 2:
            assert short(slot.value.device) in ("CPU:0", "CPU:1")


def test_a_dict_partition_may_place_layers_in_any_order():
    strategy = keras_parallel.PipelineParallel(
        devices(2), partition={"first": "CPU:0", "last": "CPU:1"}
    )
    with strategy.scope():
        model = Reversed()
        model.compile("sgd", SCE)
    model.fit(DENSE_DATA["x"], DENSE_DATA["y"], batch_size=32, verbose=0)
    assert short(model.last.kernel.value.device) == "CPU:1"
    assert short(model.first.kernel.value.device) == "CPU:0"


def fit_in(strategy, build, batch_size=32):
    with strategy.scope():
        model = build()
    model.fit(DENSE_DATA["x"], DENSE_DATA["y"], batch_size=batch_size, verbose=0)


def two_layers():
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8), keras.layers.Dense(3)]
    )
    model.compile("sgd", SCE)
    return model


@pytest.mark.parametrize(
    "make, fragments",
    [
        (
            lambda: fit_in(keras_parallel.PipelineParallel(devices(4)), two_layers),
            [
                "has 2 layers to split into stages, fewer than the 4 stages",
                "Use fewer devices",
            ],
        ),
        (
            lambda: fit_in(
                keras_parallel.PipelineParallel(devices(2), num_microbatches=4),
                two_layers,
                batch_size=30,
            ),
            [
                "batch size, 30, is not a multiple of num_microbatches=4",
                "(for example 28)",
            ],
        ),
        (
            lambda: fit_in(
                keras_parallel.PipelineParallel(devices(2), partition=[1, 2]),
                two_layers,
            ),
            ["stage sizes [1, 2] add up to 3", "model has 2 layers to split"],
        ),
        (
            lambda: fit_in(
                keras_parallel.PipelineParallel(
                    devices(2), partition={"nope": "CPU:1"}
                ),
                two_layers,
            ),
            ["names layers ['nope']", "Its layers, in order"],
        ),
        (lambda: keras_parallel.PipelineParallel(["CPU:0", "CPU:9"]), ["CPU:9"]),
        (
            lambda: keras_parallel.PipelineParallel(
                devices(2), partition={"a": "CPU:3"}
            ),
            ["not among the strategy's devices"],
        ),
        (
            lambda: keras_parallel.PipelineParallel(devices(2), partition=[1]),
            ["gives 1 stage sizes for 2 devices"],
        ),
        (
            lambda: keras_parallel.PipelineParallel(devices(2), partition="even"),
            ["'auto', 'time', a list of positive stage sizes", "partition='even'"],
        ),
        (
            lambda: keras_parallel.PipelineParallel(devices(2), num_microbatches=0),
            ["`num_microbatches` must be an integer >= 1", "num_microbatches=0"],
        ),
    ],
)
def test_bad_input(make, fragments):
    with pytest.raises(ValueError) as raised:
        make()
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("traced", [False, True])
def test_pipelined_gradients_equal_unpipelined(traced):
    x, y = DENSE_DATA["x"][:64], DENSE_DATA["y"][:64]

    def gradients(model, strategy=None):
        strategy = strategy or tf.distribute.get_strategy()

        def compute():
            with tf.GradientTape() as tape:
                loss = SCE(y, model(x, training=True))
            return tape.gradient(loss, model.trainable_variables)

        def step():  # a custom loop's step: the strategy runs the model
            return strategy.run(compute)

        return (tf.function(step) if traced else step)()

    plain = adam_mlp()
    strategy = keras_parallel.PipelineParallel(devices(4), num_microbatches=8)
    with strategy.scope():
        pipelined = adam_mlp()
    pipelined.set_weights(plain.get_weights())
    for a, b in zip(gradients(pipelined, strategy), gradients(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_tensor_passed_twice_to_a_layer_gets_its_gradient_once():
    def build():
        inputs = keras.Input((16,))
        a = keras.layers.Dense(8)(inputs)
        doubled = keras.layers.Add()([a, a])
        model = keras.Model(inputs, keras.layers.Dense(3)(doubled))
        model.compile(keras.optimizers.SGD(0.1), SCE)
        return model

    single, _ = train(build, DENSE_DATA)
    model, _ = train(build, DENSE_DATA, keras_parallel.PipelineParallel(devices(3)))
    assert max_weight_diff(model, single) <= 1e-5


def test_the_old_name_warns_and_trains_the_same():
    with pytest.warns(DeprecationWarning, match="now keras_parallel.PipelineParallel"):
        old = keras_parallel.ModelParallel(devices(2), num_microbatches=2)
    assert isinstance(old, keras_parallel.PipelineParallel)
    assert (
        old.stage_devices == keras_parallel.PipelineParallel(devices(2)).stage_devices
    )
    model, _ = train(adam_mlp, DENSE_DATA, old)
    reference, _ = train(
        adam_mlp,
        DENSE_DATA,
        keras_parallel.PipelineParallel(devices(2), num_microbatches=2),
    )
    assert max_weight_diff(model, reference) == 0
