"""`DataParallel(sharding="parameters")`: every weight split by rows over the
devices, gathered where a layer uses it, its gradient reduce-scattered."""

from __future__ import annotations

import keras
import pytest
from models import CASES
from test_sharded_optimizer import traced_train_step
from transparency import (
    devices,
    max_history_diff,
    max_weight_diff,
    one_device,
    train,
)

import keras_parallel
from keras_parallel.data_parallel.parameter_shards import GatheredRows


def parameters(n):
    return keras_parallel.DataParallel(devices(n), sharding="parameters")


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_device(case, num_devices):
    build, data, tolerance = CASES[case]
    reference, reference_history = one_device(case)
    model, history = train(build, data, parameters(num_devices))
    assert max_weight_diff(model, reference) <= tolerance
    assert max_history_diff(history, reference_history) <= tolerance


def held_bytes(model, num_devices) -> list[int]:
    held = [0] * num_devices
    for variable in model.weights + model.optimizer.variables:
        value = variable.value
        for copy in getattr(value, "values", [value]):
            held[int(copy.device.rsplit(":", 1)[-1])] += copy.numpy().nbytes
    return held


def embedding_model():
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(100_000, 40),  # 4 M elements
            keras.layers.Flatten(),
            keras.layers.Dense(8),
        ]
    )
    model.compile(keras.optimizers.Adam(), "mse")
    return model


def test_each_device_holds_a_quarter_of_weights_and_state():
    strategy = parameters(4)
    with strategy.scope():
        model = embedding_model()
        model.optimizer.build(model.trainable_variables)
    with keras.device("CPU:0"):
        plain = embedding_model()
        plain.optimizer.build(plain.trainable_variables)
    total = sum(held_bytes(plain, 1))
    held = held_bytes(model, 4)
    largest_layer = 4 * 100_000 * 40
    # Weights and Adam state: 16 + 32 MB, each device a quarter of it; the
    # gathered embedding (16 MB) exists only while the step runs.
    assert max(held) <= 1.1 * total / 4
    assert max(held) + largest_layer <= 1.1 * total / 4 + largest_layer
    # What DeviceMemoryMonitor and placement_report show: the same bytes.
    monitor = keras_parallel.callbacks.DeviceMemoryMonitor(print_table=False)
    monitor.set_model(model)
    measured = monitor.measure()
    report = keras_parallel.placement_report(model)
    for r in range(4):
        assert measured[f"CPU:{r}"] == (held[r], "variables")
        assert report.devices[f"CPU:{r}"].total_bytes == held[r]
    for variable in model.trainable_variables:
        value = variable.value
        assert isinstance(value, GatheredRows)
        rows = -(-variable.shape[0] // 4)
        assert [tuple(c.shape) for c in value.values] == [
            (rows, *variable.shape[1:])
        ] * 4


def test_layers_compute_on_gathered_weights_and_update_their_rows():
    strategy = parameters(2)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((64,))]
            + [keras.layers.Dense(64, use_bias=False) for _ in range(2)]
        )
        model.compile(keras.optimizers.Adam(1e-3), "mse")
    graph = traced_train_step(strategy, model)
    matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
    forward = [
        op
        for op in matmuls
        if not op.get_attr("transpose_a") and not op.get_attr("transpose_b")
    ]
    backward = [op for op in matmuls if op.get_attr("transpose_b")]
    # Forward: each device multiplies by whole (gathered) kernels.
    assert (
        sorted(
            (op.device.rsplit(":", 1)[-1], tuple(op.inputs[1].shape)) for op in forward
        )
        == [("0", (64, 64))] * 2 + [("1", (64, 64))] * 2
    )
    # Backward: the input gradients take kernels gathered again; nothing but
    # its forward product reads a forward-gathered kernel (PyTorch FSDP's
    # order: no whole kernel waits from the forward to the backward pass).
    assert len(backward) == 4
    for op in forward:
        assert [c.name for c in op.inputs[1].consumers()] == [op.name]
    regathered = {op.inputs[1].name for op in backward}
    assert not regathered & {op.inputs[1].name for op in forward}
    # Update: each device's Adam works on its half of the rows.
    sqrt = sorted(
        (op.device.rsplit(":", 1)[-1], tuple(op.outputs[0].shape))
        for op in graph.get_operations()
        if op.type == "Sqrt" and op.outputs[0].shape.rank
    )
    assert sqrt == [("0", (32, 64))] * 2 + [("1", (32, 64))] * 2
    stats = strategy.communication_stats()
    weight_bytes = 2 * 64 * 64 * 4
    # Gathered twice, each device putting in its half.
    assert stats["all_gather_bytes_per_step"] == 2 * weight_bytes / 2
    assert stats["reduce_scatter_bytes_per_step"] == weight_bytes
    assert stats["all_reduce_bytes_per_step"] == 0


def mlp():
    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(16), keras.layers.Dense(4)]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def test_optimizer_that_is_not_elementwise_is_refused():
    with parameters(2).scope():
        model = mlp()
        model.compile(keras.optimizers.Lamb(1e-3), "mse")
        with pytest.raises(ValueError) as raised:
            model.optimizer.build(model.trainable_variables)
    message = str(raised.value)
    assert "the optimizer is a Lamb" in message
    assert "Adam" in message and "sharding='gradients'" in message
