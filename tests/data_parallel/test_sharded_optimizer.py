"""Optimizer-state sharding: slots and updates on each variable's owner."""

import keras
import pytest
import tensorflow as tf
from transparency import devices

import keras_parallel
from keras_parallel.data_parallel.ownership import OwnerTable


def four_equal_layers():
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, use_bias=False) for _ in range(4)]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def owner_device(strategy, variable):
    mirrored = variable.value
    return mirrored.values[strategy.extended._owners.owner(mirrored)].device


def test_owner_table_balances_bytes_greedily():
    table = OwnerTable(2)
    sizes = [tf.Variable(tf.zeros([n])) for n in (100, 10, 10, 80, 5)]
    owners = [table.assign(v) for v in sizes]
    assert owners == [0, 1, 1, 1, 0]
    assert table.owned_bytes == [4 * 105, 4 * 100]


@pytest.mark.parametrize("num_devices", [2, 4])
def test_slots_live_once_on_the_owner_and_split_evenly(num_devices):
    strategy = keras_parallel.DataParallel(devices(num_devices))
    with strategy.scope():
        model = four_equal_layers()
    slot_bytes = {}
    for variable in model.trainable_variables:
        for slot in ("momentum", "velocity"):
            found = [
                s
                for s in model.optimizer.variables
                if s.path.endswith(variable.path.replace("/", "_") + "_" + slot)
            ]
            assert len(found) == 1
            tf_slot = found[0].value
            assert isinstance(tf_slot, tf.Variable) and not hasattr(tf_slot, "values")
            assert tf_slot.device == owner_device(strategy, variable)
            slot_bytes[tf_slot.device] = slot_bytes.get(tf_slot.device, 0) + 64 * 64 * 4
    # Four equal weights: each device holds exactly 4/num_devices of the slots.
    assert (
        sorted(slot_bytes.values())
        == [4 * 2 * 64 * 64 * 4 // num_devices] * num_devices
    )


def traced_train_step(strategy, model):
    data = tf.data.Dataset.from_tensors((tf.ones([8, 64]), tf.ones([8, 64])))
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


@pytest.mark.parametrize("shard_optimizer", [True, False])
def test_each_update_runs_once_on_its_owner(shard_optimizer):
    strategy = keras_parallel.DataParallel(devices(2), shard_optimizer=shard_optimizer)
    with strategy.scope():
        model = four_equal_layers()
    graph = traced_train_step(strategy, model)
    # Keras' Adam takes two square roots per variable update (bias
    # correction and the denominator).
    sqrt_devices = sorted(
        op.device for op in graph.get_operations() if op.type == "Sqrt"
    )
    if shard_optimizer:
        expected = sorted(owner_device(strategy, v) for v in model.trainable_variables)
    else:
        expected = sorted(
            c.device for v in model.trainable_variables for c in v.value.values
        )
    assert sqrt_devices == sorted(expected * 2)
