"""XLA inside each device's part of a step (`keras_parallel/xla.py`): the same
numbers as one device compiled by Keras, each device's ops compiled into
clusters on that device, the reduction between them."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import CASES, MLP_DATA, fp16_loss_scale
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel
from keras_parallel._tf_internal import executed_graphs
from keras_parallel.graph_memory import traced_train_step
from keras_parallel.xla import compiles

# Substrings of the types of matmuls and convolutions, forward and backward,
# as Grappler leaves them (oneDNN renames and fuses: `_MklMatMul`,
# `_FusedConv2D`, ...).
COMPUTE = ("MatMul", "Conv2D")


def compiled_by_keras(build):
    """`build`, with the model compiled by XLA on one device."""

    def build_compiled():
        model = build()
        model.jit_compile = True
        return model

    return build_compiled


@pytest.fixture
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def run_recorded(build, data, strategy):
    """`train` under `strategy`, recording the graphs TensorFlow ran."""
    with executed_graphs() as graphs:
        model, history = train(build, data, strategy)
    return model, history, graphs


def compiled_runs(graphs) -> dict[str, int]:
    """XLA cluster launches per device in the executed graphs."""
    runs: dict[str, int] = {}
    for graph in graphs:
        for node in graph.node:
            if node.op == "_XlaRun":
                device = tf.DeviceSpec.from_string(node.device)
                key = f"CPU:{device.device_index}"
                runs[key] = runs.get(key, 0) + 1
    return runs


def uncompiled(graphs, kinds) -> list[tuple[str, str]]:
    """(name, type) of the ops whose type contains one of `kinds` that
    TensorFlow ran outside XLA clusters."""
    return [
        (n.name, n.op) for g in graphs for n in g.node if any(k in n.op for k in kinds)
    ]


CASE_STRATEGIES = [
    (
        "mlp_sgd_momentum",
        lambda: keras_parallel.DataParallel(devices(2), jit_compile=True),
    ),
    (
        "conv_batchnorm_adam",
        lambda: keras_parallel.DataParallel(devices(2), jit_compile=True),
    ),
    (
        "weighted_regularized",
        lambda: keras_parallel.PipelineParallel(
            devices(2), 4, schedule="1f1b", recompute="auto", jit_compile=True
        ),
    ),
]


@pytest.mark.parametrize("case, strategy", CASE_STRATEGIES)
def test_compiled_replicas_train_as_one_compiled_device(case, strategy):
    build, data, _ = CASES[case]
    reference, reference_history = train(compiled_by_keras(build), data)
    model, history, graphs = run_recorded(build, data, strategy())
    assert max_weight_diff(reference, model) <= 1e-5
    assert max_history_diff(reference_history, history) <= 1e-5
    # Every device ran compiled clusters, and every matmul and convolution
    # ran in one but those Grappler's oneDNN remapper fused with their bias
    # and activation before XLA's clustering (forward ops, on CPUs only).
    assert set(compiled_runs(graphs)) == {"CPU:0", "CPU:1"}
    outside = uncompiled(graphs, COMPUTE)
    assert all("Fused" in op for _, op in outside), outside


def test_mixed_precision_compiled_replicas(float32_after):
    reference, _ = train(compiled_by_keras(fp16_loss_scale), MLP_DATA)
    strategy = keras_parallel.DataParallel(devices(2), jit_compile=True)
    model, _, graphs = run_recorded(fp16_loss_scale, MLP_DATA, strategy)
    assert max_weight_diff(reference, model) <= 1e-5
    assert set(compiled_runs(graphs)) == {"CPU:0", "CPU:1"}


def test_reduction_runs_between_compiled_parts():
    # In the traced step, each device's ops are marked for XLA on that device;
    # the ops that add gradients across devices are not.
    build, data, _ = CASES["mlp_sgd_momentum"]
    strategy = keras_parallel.DataParallel(devices(2), jit_compile=True)
    with strategy.scope():
        model = build()
    x, y = data["x"][:64], data["y"][:64]
    model.evaluate(x, y, verbose=0)  # builds the metrics' variables
    graph = traced_train_step(model, x, y)
    compiled, crossing = [], []
    for op in graph.get_operations():
        scope = op.node_def.attr.get("_XlaScope")
        devices_in = {
            tf.DeviceSpec.from_string(t.op.device).device_index
            for t in op.inputs
            if t.op.device and t.op.type != "Placeholder"
        }
        if scope is not None:
            compiled.append(op)
            index = tf.DeviceSpec.from_string(op.device).device_index
            assert scope.s.decode().endswith(f"CPU:{index}"), op.name
            assert devices_in <= {index}, (op.name, devices_in)
        elif len(devices_in) > 1:
            crossing.append(op)
    matmuls = [op for op in compiled if op.type == "MatMul"]
    # Forward and two gradients of each of 2 Dense layers, on each replica.
    assert {tf.DeviceSpec.from_string(op.device).device_index for op in matmuls} == {
        0,
        1,
    }
    assert len(matmuls) >= 2 * 2 * 2
    assert crossing, "the gradient reduction adds across devices"


def test_auto_compiles_on_gpus_when_the_model_supports_xla():
    model = CASES["mlp_sgd_momentum"][0]()
    gpus = ["/device:GPU:0", "/device:GPU:1"]
    assert compiles("auto", gpus, [model])
    assert not compiles("auto", devices(2), [model])
    assert not compiles(False, gpus, [model])
    assert compiles(True, devices(2), [model])

    class NoXla(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_jit = False

        def call(self, x):
            return x

    unsupported = keras.Sequential([keras.Input((4,)), NoXla(), keras.layers.Dense(1)])
    assert not compiles("auto", gpus, [unsupported])


def test_default_strategies_do_not_compile_on_cpus():
    build, data, _ = CASES["mlp_sgd_momentum"]
    _, _, graphs = run_recorded(build, data, keras_parallel.DataParallel(devices(2)))
    assert compiled_runs(graphs) == {}
    # The backward's matmuls, which run in clusters when compiled.
    assert [op for _, op in uncompiled(graphs, COMPUTE) if "Fused" not in op]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_jit_compile_is_refused(value):
    with pytest.raises(
        ValueError, match=r"`jit_compile` must be True, False or 'auto'"
    ):
        keras_parallel.DataParallel(devices(2), jit_compile=value)
    with pytest.raises(ValueError, match=r"Received: jit_compile="):
        keras_parallel.PipelineParallel(devices(2), jit_compile=value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_parallel.DataParallel(devices(2)),
        lambda: keras_parallel.PipelineParallel(devices(2)),
    ],
)
def test_keras_jit_compile_names_the_strategy_argument(make):
    strategy = make()
    name = type(strategy).__name__
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    x = np.zeros((8, 4), "float32")
    with pytest.raises(ValueError, match=rf"`{name}\(\.\.\., jit_compile=True\)`"):
        model.fit(x, x[:, :2], verbose=0)
