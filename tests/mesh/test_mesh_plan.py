"""Roles of layers with split weights, and the exchanges each role costs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from mesh_models import mesh, mlp, mlp_data, mlp_layouts
from transparency import max_history_diff, max_weight_diff, train

import keras_parallel
from keras_parallel.mesh.plan import einsum_axis, plan_layers


def _roles(model):
    return {layer.name: role for layer, role in plan_layers([model]).values()}


def _built(build, layout_map):
    strategy = keras_parallel.MeshParallel(layout_map)
    with strategy.scope():
        return strategy, build()


def test_column_row_pair_keeps_its_slices():
    _, model = _built(mlp, mlp_layouts(mesh((2, 2))))
    roles = _roles(model)
    assert set(roles) == {"up", "down"}
    assert (roles["up"].kind, roles["up"].gather_output) == ("column", False)
    assert (roles["down"].kind, roles["down"].split_input) == ("row", False)


def test_attention_split_by_heads_runs_per_head():
    from mesh_models import transformer_block, transformer_layouts

    _, model = _built(transformer_block, transformer_layouts(mesh((2, 2))))
    roles = _roles(model)
    assert roles["mha"].kind == "attention"
    for name in ("query", "key", "value"):
        assert (roles[name].kind, roles[name].axis, roles[name].enter) == (
            "column",
            -2,
            False,
        )
        assert not roles[name].gather_output
    assert (roles["attention_output"].kind, roles["attention_output"].axis) == (
        "row",
        -2,
    )
    assert roles["embed"].kind == "vocabulary"


@pytest.mark.parametrize(
    "spec, label, axis", [("abc", "c", -1), ("abcd", "c", -2), ("...b", "b", -1)]
)
def test_einsum_axes_count_from_the_end(spec, label, axis):
    assert einsum_axis(spec, label) == axis


def _sequential():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="dense_a"),
            keras.layers.Dense(16, activation="relu", name="dense_b"),
            keras.layers.Dense(4, name="dense_c"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


@pytest.mark.parametrize(
    "kernel_layout, expected_kind",
    [((None, "model"), "column"), (("model", None), "row")],
)
def test_unpaired_layers_give_whole_tensors_to_their_neighbours(
    kernel_layout, expected_kind
):
    # The guide's style: every Dense split the same way, so no column layer
    # is followed by a row layer; each joins (or cuts) at its boundary.
    layout_map = keras.distribution.LayoutMap(mesh((2, 2)))
    layout_map[".*/dense_[abc]/kernel"] = kernel_layout
    x, y = mlp_data()
    y = np.concatenate([y, y[:, :1]], axis=1)
    kwargs = {"x": x, "y": y, "batch_size": 16, "epochs": 2}
    reference, reference_history = train(_sequential, kwargs)
    strategy = keras_parallel.MeshParallel(layout_map)
    model, history = train(_sequential, kwargs, strategy)
    roles = _roles(model)
    assert {role.kind for role in roles.values()} == {expected_kind}
    assert all(role.gather_output and role.split_input for role in roles.values())
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, reference_history) <= 1e-5
    # Column layers join their outputs forward and sum their inputs'
    # gradients backward; row layers sum their partials forward and join
    # their inputs' gradients backward.
    exchanges = {(e["kind"], e["phase"]) for e in strategy.exchanges()}
    if expected_kind == "column":
        assert exchanges == {("all_gather", "forward"), ("all_reduce", "backward")}
    else:
        assert exchanges == {("all_reduce", "forward"), ("all_gather", "backward")}
