"""Split weights are saved whole: files load with no strategy or under
another mesh and continue as single-device training does."""

from __future__ import annotations

import json

import keras
import numpy as np
from mesh_models import mesh, transformer_block, transformer_data, transformer_layouts
from transparency import max_weight_diff, train

import keras_parallel

TOLERANCE = 1e-5


def _strategy(shape):
    return keras_parallel.MeshParallel(
        transformer_layouts(mesh(shape)), batch_dim_name="batch"
    )


def _fit_once(model):
    x, y = transformer_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)


def test_saved_model_loads_anywhere_and_trains_on_as_one_device(tmp_path):
    x, y = transformer_data()
    kwargs = {"x": x, "y": y, "batch_size": 16, "epochs": 1}
    reference, _ = train(transformer_block, kwargs)
    model, _ = train(transformer_block, kwargs, _strategy((2, 2)))
    path = str(tmp_path / "mesh.keras")
    model.save(path)

    plain = keras.models.load_model(path)
    # Plain Keras layers with the user's config, nothing of ours.
    assert "keras_parallel" not in json.dumps(plain.get_config())
    assert all(type(layer).__module__.startswith("keras.") for layer in plain.layers)
    assert max_weight_diff(plain, reference) <= TOLERANCE
    for saved, expected in zip(plain.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(saved, expected)  # whole, not a shard
    np.testing.assert_allclose(
        plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )

    with _strategy((1, 4)).scope():
        other_mesh = keras.models.load_model(path)
    _fit_once(plain)
    _fit_once(other_mesh)
    _fit_once(reference)
    # Optimizer state came along: both continue as one device does.
    assert max_weight_diff(plain, reference) <= TOLERANCE
    assert max_weight_diff(other_mesh, reference) <= TOLERANCE


def test_weights_files_and_set_weights_round_trip(tmp_path):
    model, _ = train(
        transformer_block,
        dict(zip(("x", "y"), transformer_data(), strict=True), batch_size=16),
        _strategy((2, 2)),
    )
    path = str(tmp_path / "mesh.weights.h5")
    model.save_weights(path)
    with _strategy((2, 2)).scope():
        fresh = transformer_block()
        fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    assert max_weight_diff(fresh, model) == 0
    keras.utils.set_random_seed(1)
    plain = transformer_block()
    fresh.set_weights(plain.get_weights())
    assert max_weight_diff(fresh, plain) == 0
    # A split copy holds its part of what was set.
    kernel = fresh.get_layer("ffn_up").kernel
    first, second = (c.numpy() for c in kernel.value.values[:2])
    np.testing.assert_array_equal(
        np.concatenate([first, second], axis=1),
        plain.get_layer("ffn_up").kernel.numpy(),
    )
