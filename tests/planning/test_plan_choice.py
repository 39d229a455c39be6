"""`keras_parallel.plan`: the choice, the table, and the errors."""

import keras
import numpy as np
import pytest
from plan_models import BATCH, compiled

import keras_parallel

DEVICES = ["CPU:0", "CPU:1"]


def _sgd():
    return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)


def test_a_model_too_big_for_one_device_is_split_and_trains_as_on_one():
    model = compiled("mlp", _sgd())
    roomy = keras_parallel.plan(model, BATCH, DEVICES, device_memory=2**30)
    replicated = next(
        c for c in roomy.candidates if c.name == "DataParallel(sharding=None)"
    )
    # Less than one device needs for weights, momentum and activations.
    budget = replicated.largest.total - 1
    plan = keras_parallel.plan(model, BATCH, DEVICES, device_memory=budget)

    assert not next(c for c in plan.candidates if c.name == replicated.name).fits
    fitting = [c for c in plan.candidates if c.largest.total <= budget]
    assert plan.best in fitting
    assert plan.best.name != replicated.name
    assert (plan.best.communication, plan.best.largest.total) == min(
        (c.communication, c.largest.total) for c in fitting
    )

    rng = np.random.default_rng(0)
    x = rng.random((4 * BATCH, 32), dtype=np.float32)
    y = rng.integers(0, 10, 4 * BATCH).astype("int32")
    start = model.get_weights()
    reference = compiled("mlp", _sgd())
    reference.set_weights(start)
    reference.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    strategy = plan.best.strategy()
    assert strategy is not plan.best.strategy()  # a new one each time
    with strategy.scope():
        split = compiled("mlp", _sgd())
        split.set_weights(start)
    split.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    for got, want in zip(split.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_table_has_one_row_per_candidate_and_marks_the_best():
    plan = keras_parallel.plan(compiled("mlp"), BATCH, DEVICES, device_memory=2**30)
    lines = str(plan).splitlines()
    rows = [line for line in lines if "Parallel(" in line]
    assert [r[2:].split("  ")[0] for r in rows] == [c.name for c in plan.candidates]
    assert [r for r in rows if r.startswith("* ")] == [
        r for r in rows if plan.best.name in r
    ]
    held = plan.best.largest
    assert held.total == (
        held.weights
        + held.gradients
        + held.optimizer
        + held.activations
        + held.gathered
    )


def test_a_budget_nothing_fits_names_the_smallest_requirement():
    model = compiled("mlp")
    roomy = keras_parallel.plan(model, BATCH, DEVICES, device_memory=2**30)
    least = min(roomy.candidates, key=lambda c: c.largest.total)
    with pytest.raises(ValueError) as error:
        keras_parallel.plan(model, BATCH, DEVICES, device_memory=1000)
    assert f"{least.largest.total:,} bytes per device, by {least.name}" in str(
        error.value
    )
    assert "device_memory=1,000" in str(error.value)


def test_a_model_that_is_not_built_is_refused():
    model = keras.Sequential([keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="not built.*Build it first"):
        keras_parallel.plan(model, BATCH, DEVICES, device_memory=2**30)


def test_a_model_that_is_not_compiled_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="not compiled.*model.compile"):
        keras_parallel.plan(model, BATCH, DEVICES, device_memory=2**30)


@pytest.mark.parametrize("batch_size", [0, -8, 2.5, "16", True])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(batch_size):
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1"):
        keras_parallel.plan(compiled("mlp"), batch_size, DEVICES, device_memory=2**30)


def test_unknown_devices_are_refused():
    with pytest.raises(ValueError, match="CPU:9"):
        keras_parallel.plan(compiled("mlp"), BATCH, ["CPU:9"], device_memory=2**30)


def test_device_memory_is_required_on_cpus():
    with pytest.raises(ValueError, match="`device_memory` is required"):
        keras_parallel.plan(compiled("mlp"), BATCH, DEVICES)


def _sequence_model():
    tokens = keras.Input((None,), dtype="int32")  # variable length, as keras.io
    hidden = keras.layers.Embedding(50, 8)(tokens)
    hidden = keras.layers.Dense(16, activation="relu")(hidden)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    model = keras.Model(tokens, keras.layers.Dense(3)(pooled))
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_a_variable_length_input_is_measured_at_16_steps():
    """An axis the model leaves unknown besides the batch's is measured at 16
    (`sample_data`): the estimate equals the traced step at that length."""
    from keras_parallel import graph_memory

    plan = keras_parallel.plan(
        _sequence_model(), BATCH, devices=["CPU:0", "CPU:1"], device_memory=2**30
    )
    (replicated,) = [c for c in plan.candidates if c.name.endswith("sharding=None)")]
    strategy = replicated.strategy()
    with strategy.scope():
        model = _sequence_model()
    x = np.zeros((BATCH, 16), "int32")
    held = graph_memory.held_bytes(
        graph_memory.traced_train_step(model, x, np.zeros(BATCH, "int32"))
    )
    for device, predicted in zip(
        ["CPU:0", "CPU:1"], replicated.per_device, strict=True
    ):
        assert abs(predicted.activations / held[device] - 1) <= 0.10
