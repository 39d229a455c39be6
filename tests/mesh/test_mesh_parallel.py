"""Transparency: MeshParallel trains plain Keras models with split weights to
the numbers of single-device training, with each device holding its share.

Tolerance: 1e-5, as the issue asks. Float32 rounding alone moves these runs
by 1.8e-6 (the transformer trained on one device with the samples of every
batch in reverse order: `test_rounding_alone_moves_less_than_the_tolerance`);
the meshes differ from one device by at most 3.1e-6, DataParallel on 4
devices by 2.5e-6.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
from graph_devices import short, traced_train_step
from mesh_models import (
    mesh,
    mlp,
    mlp_data,
    mlp_layouts,
    transformer_block,
    transformer_data,
    transformer_layouts,
)
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel
from keras_parallel.mesh.plan import plan_layers

TOLERANCE = 1e-5
MESHES = [(2, 2), (1, 4), (4, 1)]
CASES = {
    "mlp": (mlp, mlp_data, mlp_layouts),
    "transformer": (transformer_block, transformer_data, transformer_layouts),
}
# The embedding split by width instead of vocabulary (on the 2x2 mesh only).
WIDTH_LAYOUTS = functools.partial(transformer_layouts, embedding=(None, "model"))


def fit_kwargs(case: str) -> dict:
    x, y = CASES[case][1]()
    return {"x": x, "y": y, "batch_size": 16, "epochs": 2}


@functools.cache
def single_device(case: str):
    return train(CASES[case][0], fit_kwargs(case))


@functools.cache
def on_mesh(case: str, shape: tuple[int, int]):
    build, _, layouts = CASES[case]
    strategy = keras_parallel.MeshParallel(layouts(mesh(shape)), batch_dim_name="batch")
    model, history = train(build, fit_kwargs(case), strategy)
    return strategy, model, history


def test_embedding_split_by_width_matches_single_device():
    reference, reference_history = single_device("transformer")
    strategy = keras_parallel.MeshParallel(WIDTH_LAYOUTS(mesh((2, 2))))
    model, history = train(transformer_block, fit_kwargs("transformer"), strategy)
    roles = {layer.name: role for layer, role in plan_layers([model]).values()}
    assert (roles["embed"].kind, roles["embed"].axis) == ("width", -1)
    assert max_weight_diff(model, reference) <= TOLERANCE
    assert max_history_diff(history, reference_history) <= TOLERANCE


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_device(case, shape):
    reference, reference_history = single_device(case)
    _, model, history = on_mesh(case, shape)
    assert max_weight_diff(model, reference) <= TOLERANCE
    assert max_history_diff(history, reference_history) <= TOLERANCE
    x, _ = CASES[case][1]()
    expected = reference.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=TOLERANCE)


def test_rounding_alone_moves_less_than_the_tolerance():
    reference, _ = single_device("transformer")
    x, y = transformer_data()
    order = np.concatenate([np.arange(i, i + 16)[::-1] for i in range(0, len(x), 16)])
    reordered, _ = train(
        transformer_block,
        {"x": x[order], "y": y[order], "batch_size": 16, "epochs": 2},
    )
    moved = max_weight_diff(reordered, reference)
    assert 0 < moved < TOLERANCE / 2


def test_batch_axis_alone_is_data_parallel():
    _, model, history = on_mesh("mlp", (4, 1))
    data_parallel, dp_history = train(
        mlp, fit_kwargs("mlp"), keras_parallel.DataParallel(devices(4))
    )
    assert max_weight_diff(model, data_parallel) <= 1e-6
    assert max_history_diff(history, dp_history) <= 1e-6


def _built_by_keras(make):
    """A `keras.distribution` object, or None where Keras cannot build it on
    TensorFlow (before 3.15 its TF distribution_lib lacks `num_processes`)."""
    try:
        return make()
    except AttributeError:
        assert keras.version() < "3.15"
        return None


def test_keras_distribution_objects_are_taken_as_they_are():
    device_mesh = mesh((2, 2))
    reference, _ = single_device("mlp")
    sources = [
        # The axes in the other order: the model axis first.
        mlp_layouts(mesh((2, 2), axis_names=("model", "batch"))),
        _built_by_keras(
            lambda: keras.distribution.ModelParallel(
                layout_map=mlp_layouts(device_mesh), batch_dim_name="batch"
            )
        ),
    ]
    for source in filter(None, sources):
        strategy = keras_parallel.MeshParallel(source, batch_dim_name="batch")
        assert strategy.mesh_shape == (2, 2)
        model, _ = train(mlp, fit_kwargs("mlp"), strategy)
        assert max_weight_diff(model, reference) <= TOLERANCE
    assert keras_parallel.MeshParallel(device_mesh).mesh_shape == (2, 2)
    data_only = _built_by_keras(
        lambda: keras.distribution.DataParallel(devices=[f"cpu:{i}" for i in range(4)])
    )
    if data_only is not None:
        assert keras_parallel.MeshParallel(data_only).mesh_shape == (4, 1)


def _components(variable):
    return variable.value.values


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
def test_each_device_holds_its_share_of_split_weights_and_slots(shape):
    strategy, model, _ = on_mesh("transformer", shape)
    batch, parts = shape
    split = {
        "embed/embeddings": 0,
        "mha/query/kernel": 1,
        "mha/query/bias": 0,
        "mha/key/kernel": 1,
        "mha/value/kernel": 1,
        "mha/attention_output/kernel": 0,
        "ffn_up/kernel": 1,
        "ffn_up/bias": 0,
        "ffn_down/kernel": 0,
    }
    weights = {v.path: v for v in model.weights}
    slots = {}
    for slot in model.optimizer.variables:
        for path in split:
            if slot.path.endswith(path.replace("/", "_") + "_momentum"):
                slots[path] = slot
    assert len(slots) == len(split)
    for path, axis in split.items():
        whole = weights[path].numpy()
        for variable in (weights[path], slots[path]):
            copies = _components(variable)
            assert len(copies) == batch * parts
            for replica, copy in enumerate(copies):
                assert short(copy.device) == f"CPU:{replica}"
                expected = list(whole.shape)
                expected[axis] //= parts
                assert copy.shape == tuple(expected)
                # Bytes held: the whole weight's share.
                assert copy.numpy().nbytes == whole.nbytes // parts
        # Every device of a batch group holds the same shard.
        shards = [c.numpy() for c in _components(weights[path])]
        np.testing.assert_array_equal(np.concatenate(shards[:parts], axis=axis), whole)
        for replica in range(parts, batch * parts):
            np.testing.assert_array_equal(shards[replica], shards[replica % parts])
    per_device = [0] * (batch * parts)
    for variable in model.weights + model.optimizer.variables:
        value = variable.value
        for copy in getattr(value, "values", [value]):
            per_device[int(short(copy.device).split(":")[1])] += copy.numpy().nbytes
    replicated = sum(v.numpy().nbytes for v in model.weights if v.path not in split)
    split_bytes = sum(weights[p].numpy().nbytes for p in split)
    # Weights: the split ones' share and the replicated ones whole; Adam's
    # two slots of the split weights: their share.
    for held in per_device:
        assert held >= replicated + 3 * split_bytes // parts
        assert held < replicated * 3 + 3 * split_bytes // parts + 64
    report = keras_parallel.placement_report(model)
    assert [report.devices[f"CPU:{i}"].total_bytes for i in range(4)] == per_device


def test_traced_step_exchanges_in_the_right_groups():
    strategy, model, _ = on_mesh("mlp", (2, 2))
    x, y = mlp_data(8)
    nodes, _ = traced_train_step(model, strategy, x, y)
    # stem (replicated) -> up (column) -> down (row) -> head: one all-reduce
    # forward after the row layer, one backward before the column layer.
    passes = [(e["kind"], e["phase"]) for e in strategy.exchanges()]
    assert passes == [("all_reduce", "forward"), ("all_reduce", "backward")]
    model_groups = {0: {"CPU:0", "CPU:1"}, 1: {"CPU:2", "CPU:3"}}
    batch_groups = {0: {"CPU:0", "CPU:2"}, 1: {"CPU:1", "CPU:3"}}
    seen = {}
    for node in nodes:
        for scope, groups in (
            ("mesh_all_reduce_model_", model_groups),
            ("reduction_group_", batch_groups),
        ):
            if scope in node.name and node.op == "AddN":
                index = int(node.name.split(scope)[1].split("/")[0])
                assert short(node.device) in groups[index], node.name
                seen[scope, index] = seen.get((scope, index), 0) + 1
    # Per model group: 2 exchanges x 2 devices; per batch group: each
    # gradient bucket summed on its 2 devices.
    for b in (0, 1):
        assert seen["mesh_all_reduce_model_", b] == 4
        assert seen["reduction_group_", b] >= 2


def test_gradients_reduce_over_the_batch_axis_only():
    strategy, _, _ = on_mesh("mlp", (2, 2))
    stats = strategy.communication_stats()
    # stem, up (split), down (split), head: each replica sends its shard of
    # the split weights and the replicated ones whole, in float32.
    up, down = (12 * 32 + 32) // 2, (32 * 16) // 2
    replicated = (8 * 12 + 12) + 16 + (16 * 3 + 3)
    assert stats["all_reduce_bytes_per_step"] == 4 * (up + down + replicated)


def test_batch_axis_of_one_sends_no_gradients():
    strategy, _, _ = on_mesh("mlp", (1, 4))
    stats = strategy.communication_stats()
    assert stats["bytes_per_step"] == 0 and stats["reductions"] == 0


@pytest.mark.parametrize("compression", ["bf16", "powersgd"])
def test_compression_applies_along_the_batch_axis(compression):
    """bf16 halves the gradient bytes; PowerSGD keeps one state per batch
    group (each shard's error memory and Q on its own devices): at full rank
    it reconstructs every gradient, so training equals one device."""
    if compression == "powersgd":
        compression = keras_parallel.PowerSGD(rank=32, min_compression_rate=0)
    strategy = keras_parallel.MeshParallel(
        mlp_layouts(mesh((2, 2))), compression=compression
    )
    model, _ = train(mlp, fit_kwargs("mlp"), strategy)
    reference, _ = single_device("mlp")
    stats = strategy.communication_stats()
    if compression == "bf16":
        # The weights gathered after the update travel as they are.
        gathered = (
            stats["all_gather_bytes_per_step"] + stats["broadcast_bytes_per_step"]
        )
        uncompressed = stats["uncompressed_bytes_per_step"] - gathered
        assert stats["all_reduce_bytes_per_step"] * 2 == uncompressed
        assert max_weight_diff(model, reference) < 2e-2
        return
    assert max_weight_diff(model, reference) <= TOLERANCE
    states = strategy.extended.gradient_reduction.states.all()
    assert len(states) == 2  # one per batch group
    for group, state in enumerate(states):
        devices = {
            short(v.device)
            for entry in next(iter(state._groups.values()))
            for v in entry["q"] + entry["error"]
        }
        assert devices == {f"CPU:{group}", f"CPU:{group + 2}"}
