"""Functional graphs under PipelineParallel: independent branches, several
inputs and outputs, shared layers. Stages follow the data flow of the graph
(Keras calls branches by depth, not in the order of `model.layers`); only
a placement whose data flows around a cycle of devices is refused."""

import keras
import numpy as np
import pytest
from graph_devices import short
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(inputs, outputs):
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        {"out_a": SCE, "out_b": "mse"},
        metrics={"out_a": ["accuracy"]},
    )
    return model


def two_branches():
    """Two inputs, two outputs, no layer shared between the branches."""
    a, b = keras.Input((8,), name="a"), keras.Input((6,), name="b")
    ha = keras.layers.Dense(16, "relu", name="ha1")(a)
    ha = keras.layers.Dense(16, "relu", name="ha2")(ha)
    hb = keras.layers.Dense(16, "tanh", name="hb1")(b)
    hb = keras.layers.Dense(8, "relu", name="hb2")(hb)
    out_a = keras.layers.Dense(3, name="out_a")(ha)
    out_b = keras.layers.Dense(1, name="out_b")(hb)
    return compiled([a, b], [out_a, out_b])


def shared_layer():
    """`shared` runs on both inputs (siamese) and again after `middle`
    (so `shared` and `middle` must share a device); the second output
    joins both branches."""
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = keras.layers.Dense(8, "tanh", name="shared")
    middle = keras.layers.Dense(8, "relu", name="middle")
    from_a = shared(middle(shared(a)))
    joined = keras.layers.Concatenate(name="join")([shared(b), from_a])
    out_a = keras.layers.Dense(3, name="out_a")(
        keras.layers.Dense(8, "relu", name="pre_a")(from_a)
    )
    out_b = keras.layers.Dense(1, name="out_b")(
        keras.layers.Dense(8, "relu", name="pre_b")(joined)
    )
    return compiled([a, b], [out_a, out_b])


RNG = np.random.RandomState(0)


def two_inputs(width_b: int) -> dict:
    """Inputs `a` (8 features) and `b`, a class and a number to predict."""
    return dict(
        x={
            "a": RNG.rand(64, 8).astype("float32"),
            "b": RNG.rand(64, width_b).astype("float32"),
        },
        y={"out_a": RNG.randint(0, 3, 64), "out_b": RNG.rand(64, 1).astype("float32")},
        batch_size=16,
        epochs=2,
    )


DATA = {two_branches: two_inputs(6), shared_layer: two_inputs(8)}


class Reversed(keras.Model):
    """Creates its layers in the opposite order to the one it calls them in:
    `model.layers` puts `last` on the first device, and data flows from the
    second device to the first only, which is no cycle."""

    def __init__(self):
        super().__init__()
        self.last = keras.layers.Dense(3, name="last")
        self.first = keras.layers.Dense(8, name="first")

    def call(self, x):
        return self.last(self.first(x))


def reversed_model():
    model = Reversed()
    model.compile(keras.optimizers.SGD(0.1), SCE)
    return model


def test_a_subclassed_model_calling_layers_out_of_creation_order_trains():
    data = dict(
        x=RNG.rand(64, 16).astype("float32"), y=RNG.randint(0, 3, 64), batch_size=16
    )
    single, single_history = train(reversed_model, data)
    strategy = keras_parallel.PipelineParallel(devices(2), num_microbatches=2)
    model, history = train(reversed_model, data, strategy)
    assert short(model.last.kernel.value.device) == "CPU:0"
    assert short(model.first.kernel.value.device) == "CPU:1"
    assert max_weight_diff(model, single) <= 1e-5
    assert max_history_diff(history, single_history) <= 1e-5


class Reused(keras.Model):
    """Calls `inner` before and after `outer`: with the two on different
    devices, data goes CPU:0 -> CPU:1 -> CPU:0."""

    def __init__(self):
        super().__init__()
        self.inner = keras.layers.Dense(8, name="inner")
        self.outer = keras.layers.Dense(8, name="outer")

    def call(self, x):
        return self.inner(self.outer(self.inner(x)))


def fit_two_devices(build, partition):
    strategy = keras_parallel.PipelineParallel(devices(2), partition=partition)
    with strategy.scope():
        model = build()
    data = DATA[shared_layer]
    if build is shared_layer:
        model.fit(data["x"], data["y"], batch_size=16, verbose=0)
    else:
        model.fit(data["x"]["a"], np.zeros((64, 8)), batch_size=16, verbose=0)
    return model


def reused():
    model = Reused()
    model.compile("sgd", "mse")
    return model


@pytest.mark.parametrize(
    "build, partition, fragments",
    [
        (
            reused,
            "auto",
            [
                "'inner' on CPU:0 feeds 'outer' on CPU:1",
                "'outer' on CPU:1 feeds 'inner' on CPU:0",
                "partition='auto' over the devices ['CPU:0', 'CPU:1']",
                "Put the layers ['inner', 'outer'] on one device",
                "use a separate layer for the second call",
            ],
        ),
        (
            shared_layer,
            {"shared": "CPU:0", "middle": "CPU:1", "join": "CPU:0"},
            [
                "'shared' on CPU:0 feeds 'middle' on CPU:1",
                "'middle' on CPU:1 feeds 'shared' on CPU:0",
                "partition={'shared': 'CPU:0', 'middle': 'CPU:1', 'join': 'CPU:0'}",
            ],
        ),
        (
            shared_layer,
            [1, 6],  # cuts between `shared` and `middle`
            ["'middle' on CPU:1 feeds 'shared' on CPU:0", "partition=[1, 6]"],
        ),
    ],
)
def test_a_cycle_of_devices_is_refused(build, partition, fragments):
    with pytest.raises(ValueError) as raised:
        fit_two_devices(build, partition)
    message = str(raised.value)
    assert "data flows around a cycle of devices" in message
    for fragment in fragments:
        assert fragment in message


def test_the_cycle_goes_away_with_a_dict_partition():
    model = fit_two_devices(reused, {"inner": "CPU:1", "outer": "CPU:1"})
    assert short(model.inner.kernel.value.device) == "CPU:1"


def test_too_few_groups_for_the_devices():
    def build():
        inputs = keras.Input((8,))
        shared = keras.layers.Dense(8, name="shared")
        outputs = shared(keras.layers.Dense(8, name="middle")(shared(inputs)))
        model = keras.Model(inputs, outputs)
        model.compile("sgd", "mse")
        return model

    strategy = keras_parallel.PipelineParallel(devices(2))
    with strategy.scope():
        model = build()
    with pytest.raises(ValueError) as raised:
        strategy.place(model)
    message = str(raised.value)
    assert "2 layers form 1 group that cannot be split over devices" in message
    assert "[['shared', 'middle']]" in message
    assert "Use fewer devices" in message
