"""Optimizer-state sharding: slots and updates on each variable's owner."""

import keras
import pytest
import tensorflow as tf
from transparency import devices

import keras_parallel
from keras_parallel.data_parallel.ownership import OwnerTable


def four_equal_layers_with(optimizer):
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, use_bias=False) for _ in range(4)]
    )
    model.compile(optimizer, "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def four_equal_layers():
    return four_equal_layers_with(keras.optimizers.Adam(1e-3))


def owner_device(strategy, variable):
    mirrored = variable.value
    return mirrored.values[strategy.extended.mode.owners.owner(mirrored)].device


def test_owner_table_balances_bytes_greedily():
    table = OwnerTable(2)
    sizes = [tf.Variable(tf.zeros([n])) for n in (100, 10, 10, 80, 5)]
    owners = [table.assign(v) for v in sizes]
    assert owners == [0, 1, 1, 1, 0]
    assert table.owned_bytes == [4 * 105, 4 * 100]


def slot_of(model, variable, slot):
    (found,) = [
        s
        for s in model.optimizer.variables
        if s.path.endswith(variable.path.replace("/", "_") + "_" + slot)
    ]
    return found


@pytest.mark.parametrize("num_devices", [2, 4])
def test_slots_are_split_evenly_by_rows_over_the_devices(num_devices):
    strategy = keras_parallel.DataParallel(devices(num_devices), sharding="optimizer")
    with strategy.scope():
        model = four_equal_layers()
    for variable in model.trainable_variables:
        for slot in ("momentum", "velocity"):
            copies = slot_of(model, variable, slot).value.values
            assert [c.device.split(":")[-1] for c in copies] == [
                str(i) for i in range(num_devices)
            ]
            assert all(c.shape == (64 // num_devices, 64) for c in copies)


def optimizer_bytes_per_device(model) -> dict[str, int]:
    held: dict[str, int] = {}
    for variable in model.optimizer.variables:
        value = variable.value
        for copy in getattr(value, "values", [value]):
            held[copy.device] = held.get(copy.device, 0) + copy.numpy().nbytes
    return held


@pytest.mark.parametrize("sharding", ["optimizer", "gradients", "parameters"])
@pytest.mark.parametrize("num_devices", [2, 4])
def test_one_large_embedding_spreads_its_state_over_every_device(num_devices, sharding):
    # 4 M elements in one table, as a model whose bytes sit in one Embedding.
    strategy = keras_parallel.DataParallel(devices(num_devices), sharding=sharding)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,), dtype="int32"),
                keras.layers.Embedding(100_000, 40),
                keras.layers.Flatten(),
                keras.layers.Dense(8),
            ]
        )
        model.compile(keras.optimizers.Adam(), "mse")
        model.optimizer.build(model.trainable_variables)
    held = optimizer_bytes_per_device(model)
    share = sum(held.values()) / num_devices
    assert len(held) == num_devices
    assert max(held.values()) <= 1.001 * share


def test_other_optimizers_keep_each_state_whole_on_one_owner():
    # LAMB scales each variable's step by its norm: not splittable by rows.
    strategy = keras_parallel.DataParallel(devices(2))
    with strategy.scope():
        model = four_equal_layers_with(keras.optimizers.Lamb(1e-3))
    for variable in model.trainable_variables:
        tf_slot = slot_of(model, variable, "momentum").value
        assert isinstance(tf_slot, tf.Variable) and not hasattr(tf_slot, "values")
        assert tf_slot.device == owner_device(strategy, variable)


def traced_train_step(strategy, model):
    x, y = tf.ones([8, model.input_shape[-1]]), tf.ones([8, model.output_shape[-1]])
    data = tf.data.Dataset.from_tensors((x, y))
    iterator = iter(strategy.experimental_distribute_dataset(data))

    @tf.function
    def step(iterator):
        def replica_step(batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(next(iterator),))

    return step.get_concrete_function(iterator).graph


def velocity_roots(graph) -> list[tuple[str, tuple]]:
    """(device, shape) of each square root of a tensor in `graph`, sorted:
    Keras' Adam takes one of each velocity it updates."""
    return sorted(
        (op.device, tuple(op.outputs[0].shape))
        for op in graph.get_operations()
        if op.type == "Sqrt" and op.outputs[0].shape.rank
    )


@pytest.mark.parametrize("sharding", ["optimizer", "gradients", None])
def test_each_device_updates_its_part(sharding):
    strategy = keras_parallel.DataParallel(devices(2), sharding=sharding)
    with strategy.scope():
        model = four_equal_layers()
    graph = traced_train_step(strategy, model)
    # Keras' Adam takes the square root of each variable's velocity: on each
    # device, of its half of the rows when the state is split.
    sqrt = velocity_roots(graph)
    rows = 32 if sharding else 64
    expected = sorted(
        (c.device, (rows, 64))
        for v in model.trainable_variables
        for c in v.value.values
    )
    assert sqrt == expected


def test_auto_updates_each_small_weight_once_on_its_owner():
    # A 2048x1024 kernel (2 Mi elements: split by rows) and three small
    # weights (owned whole).
    strategy = keras_parallel.DataParallel(devices(2))
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((2048,)), keras.layers.Dense(1024), keras.layers.Dense(4)]
        )
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        model.optimizer.build(model.trainable_variables)
    graph = traced_train_step(strategy, model)
    # Keras' Adam takes the square root of each variable's velocity: on each
    # device, of its half of the large kernel's rows; once for a small
    # weight, whole, on its owner.
    sqrt = velocity_roots(graph)
    large, *small = model.trainable_variables
    expected = [(c.device, (1024, 1024)) for c in large.value.values] + [
        (owner_device(strategy, v), tuple(v.shape)) for v in small
    ]
    assert sqrt == sorted(expected)
    # The large kernel, split, weighs on no owner: the owners share the
    # bytes of the small weights and of the optimizer's step and rate.
    whole = [*small, model.optimizer.iterations, model.optimizer.learning_rate]
    owned = strategy.extended.mode.owners.owned_bytes
    assert sum(owned) == sum(v.numpy().nbytes for v in whole)
    assert all(owned)
