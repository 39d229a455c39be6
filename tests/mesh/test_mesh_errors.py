"""Bad meshes and layouts are refused before anything is built, each with a
message naming the value and the way out."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import run_python
from mesh_models import mesh, mlp, mlp_data, mlp_layouts

import keras_parallel


def _layouts(**entries) -> keras.distribution.LayoutMap:
    layout_map = keras.distribution.LayoutMap(mesh((2, 2)))
    for key, value in entries.items():
        layout_map[key.replace("__", "/")] = value
    return layout_map


def test_layout_naming_an_axis_not_in_the_mesh():
    # Keras' LayoutMap refuses it at assignment, naming the mesh's axes.
    with pytest.raises(ValueError, match=r"Valid axis names: .*Got \{'tensor'\}"):
        _layouts(up__kernel=(None, "tensor"))


def test_layout_splitting_a_weight_over_the_batch_axis():
    with pytest.raises(ValueError, match="over the batch axis 'batch'"):
        keras_parallel.MeshParallel(_layouts(up__kernel=("batch", "model")))


def test_mesh_larger_than_the_devices():
    # Keras itself refuses a shape that does not match the devices given...
    with pytest.raises(ValueError, match=r"shape=\(2, 4\).*devices.shape=\(4,\)"):
        keras.distribution.DeviceMesh(
            (2, 4), ("batch", "model"), devices=[f"cpu:{i}" for i in range(4)]
        )
    # ... and a mesh of devices this process does not have is refused here.
    too_big = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), devices=[f"cpu:{i}" for i in range(8)]
    )
    with pytest.raises(ValueError) as error:
        keras_parallel.MeshParallel(too_big)
    message = str(error.value)
    assert "'cpu:4'" in message and "(2, 4)" in message
    assert "virtual_devices(8)" in message


@pytest.mark.parametrize(
    "layout, expected",
    [
        # up/kernel is (12, 32): a 3-dimensional layout.
        ((None, "model", None), r"has 3 dimensions, but the variable has 2"),
        # stem/kernel is (8, 12) with 12 split over 2: fine; head/bias is (3,).
        (("model",), r"'head/bias' has shape \(3,\).*\(3\).*size 2.*multiple of 2"),
    ],
)
def test_layout_that_does_not_fit_its_variable(layout, expected):
    key = "up/kernel" if len(layout) == 3 else "head/bias"
    strategy = keras_parallel.MeshParallel(_layouts(**{key.replace("/", "__"): layout}))
    with strategy.scope(), pytest.raises(ValueError, match=expected):
        mlp()


def test_regex_matching_nothing_warns_once():
    layout_map = mlp_layouts(mesh((2, 2)))
    layout_map["decoder.*/kernel"] = (None, "model")
    strategy = keras_parallel.MeshParallel(layout_map)
    with strategy.scope():
        model = mlp()
    x, y = mlp_data(16)
    with pytest.warns(UserWarning, match=r"\['decoder\.\*/kernel'\] match no variable"):
        model.fit(x, y, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, batch_size=16, verbose=0)


def test_weight_of_a_layer_whose_computation_is_not_split():
    layout_map = keras.distribution.LayoutMap(mesh((2, 2)))
    layout_map[".*conv/kernel"] = (None, None, "model")
    strategy = keras_parallel.MeshParallel(layout_map)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8, 2)), keras.layers.Conv1D(4, 3, name="conv")]
        )
        model.compile(loss="mse")
    with pytest.raises(ValueError, match=r"'conv' \(Conv1D\).*Dense, EinsumDense"):
        model.fit(np.zeros((4, 8, 2)), np.zeros((4, 6, 4)), verbose=0)


def test_bias_layout_contradicting_its_kernel():
    strategy = keras_parallel.MeshParallel(
        _layouts(up__kernel=("model", None), up__bias=("model",))
    )
    with strategy.scope():
        model = mlp()
    x, y = mlp_data(16)
    with pytest.raises(ValueError, match=r"'up'.*bias must be replicated"):
        model.fit(x, y, batch_size=16, verbose=0)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: keras_parallel.MeshParallel("2x2"), r"takes one of keras\.distri"),
        (
            lambda: keras_parallel.MeshParallel(mesh((2, 2)), batch_dim_name="data"),
            r"one of the mesh's axes \('batch', 'model'\).*'data'",
        ),
        (
            lambda: keras_parallel.MeshParallel(
                keras.distribution.DeviceMesh(
                    (1, 2, 2), ("batch", "a", "b"), [f"cpu:{i}" for i in range(4)]
                )
            ),
            r"one or two axes.*\('batch', 'a', 'b'\)",
        ),
    ],
)
def test_arguments_refused_at_construction(make, expected):
    with pytest.raises((TypeError, ValueError), match=expected):
        make()


def test_a_cluster_is_refused():
    result = run_python(
        "import json, os\n"
        "os.environ['TF_CONFIG'] = json.dumps({'cluster': {'worker': "
        "['localhost:45671', 'localhost:45672']}, "
        "'task': {'type': 'worker', 'index': 1}})\n"
        "import keras, keras_parallel\n"
        "mesh = keras.distribution.DeviceMesh((1,), ('batch',), ['cpu:0'])\n"
        "try:\n"
        "    keras_parallel.MeshParallel(mesh)\n"
        "except ValueError as error:\n"
        "    print('refused:', error)\n"
    )
    expected = "refused: MeshParallel runs on the devices of one machine"
    assert expected in result.stdout, result.stdout + result.stderr
