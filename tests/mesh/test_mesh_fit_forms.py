"""What `fit` takes besides arrays, on a 2x2 mesh: sample weights, a batch
that does not split evenly over the batch axis, validation data, BatchNorm,
and an interrupted run resumed by BackupAndRestore."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from mesh_models import mesh, mlp, mlp_data, mlp_layouts
from transparency import StopAtEpoch, max_history_diff, max_weight_diff, train

import keras_parallel

TOLERANCE = 1e-5


def _mesh_strategy():
    return keras_parallel.MeshParallel(mlp_layouts(mesh((2, 2))))


def test_sample_weights_uneven_batches_and_validation_equal_one_device():
    x, y = mlp_data(61)  # the last batch of 13 splits 7 / 6 over the batch axis
    weights = np.random.default_rng(1).uniform(0.1, 2.0, size=61).astype("float32")
    kwargs = {
        "x": x,
        "y": y,
        "sample_weight": weights,
        "batch_size": 16,
        "epochs": 2,
        "validation_data": mlp_data(20),
    }
    reference, reference_history = train(mlp, kwargs)
    model, history = train(mlp, kwargs, _mesh_strategy())
    assert "val_loss" in history
    assert max_weight_diff(model, reference) <= TOLERANCE
    assert max_history_diff(history, reference_history) <= TOLERANCE
    # predict on a count the batch axis does not divide: each sample once.
    np.testing.assert_allclose(
        model.predict(x[:13], batch_size=16, verbose=0),
        reference.predict(x[:13], batch_size=16, verbose=0),
        atol=TOLERANCE,
    )


def _with_batch_norm():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, name="up")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(16, name="down")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


def test_batch_normalization_between_split_layers_equals_one_device():
    # `up` keeps whole outputs here (its consumer is not a row layer), so
    # BatchNormalization sees the whole features and global statistics.
    kwargs = dict(zip(("x", "y"), mlp_data(), strict=True), batch_size=16, epochs=2)
    reference, reference_history = train(_with_batch_norm, kwargs)
    model, history = train(_with_batch_norm, kwargs, _mesh_strategy())
    assert max_weight_diff(model, reference) <= TOLERANCE
    assert max_history_diff(history, reference_history) <= TOLERANCE


def test_backup_and_restore_resumes_as_the_uninterrupted_run(tmp_path):
    x, y = mlp_data()
    kwargs = {"x": x, "y": y, "batch_size": 16, "epochs": 4}
    reference, _ = train(mlp, kwargs)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        train(mlp, dict(kwargs, callbacks=[backup, StopAtEpoch(2)]), _mesh_strategy())
    # A new process would make a new strategy (here also another mesh shape).
    resumed_strategy = keras_parallel.MeshParallel(mlp_layouts(mesh((1, 4))))
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model, history = train(mlp, dict(kwargs, callbacks=[backup]), resumed_strategy)
    assert len(history["loss"]) == 2  # epochs 3 and 4
    assert max_weight_diff(model, reference) <= TOLERANCE
