"""ParameterServer on a local cluster of ps and worker processes, started by
`keras-parallel launch --ps K`. Every process is bounded by a timeout."""

import pathlib

import keras
import numpy as np
import pytest
from ps_cluster import launch
from ps_task import BATCH, COUNTING_BATCH, SAMPLES, data, train
from transparency import max_difference, saved_weights

TASK = pathlib.Path(__file__).with_name("ps_task.py")
EPOCHS = 2


def _launch(out, workers, ps=1):
    return launch(TASK, out, workers, ps, "--epochs", str(EPOCHS))


@pytest.fixture(scope="module")
def reference():
    model, history = train(epochs=EPOCHS)
    x, y = data()
    return (
        model.get_weights(),
        history.history["loss"],
        model.evaluate(x, y, batch_size=BATCH, verbose=0),
    )


def test_one_worker_equals_one_device(tmp_path, reference):
    (result,) = _launch(tmp_path, workers=1)
    assert max_difference(saved_weights(result), reference[0]) <= 1e-5
    np.testing.assert_allclose(result["loss"], reference[1], rtol=1e-5)
    # Alone, no other update ever comes between a read and a write.
    steps = EPOCHS * SAMPLES // BATCH
    assert int(result["updates"]) == int(result["total_updates"]) == steps
    assert int(result["max_staleness"]) == 0
    # CommunicationMonitor logged it each epoch.
    np.testing.assert_array_equal(result["logged_staleness"], np.zeros((2, EPOCHS)))
    # The variables and Adam's arithmetic live on the ps task; the forward
    # pass and the metrics stay on the worker.
    for name in ("model_variables", "optimizer_variables", "Sqrt"):
        assert list(result[name]) == ["/job:ps"], (name, result[name])
    for name in ("metric_variables", "MatMul"):
        assert list(result[name]) == ["/job:worker"], (name, result[name])
    # Saved from variables on the ps task, loaded with no strategy.
    loaded = keras.models.load_model(tmp_path / "worker_0.keras")
    assert max_difference(loaded.get_weights(), reference[0]) == 0.0
    # keras.io patterns and a model of two inputs and outputs, in float64:
    # weights and per-batch logs as without the strategy.
    patterns = {k: v for k, v in result.items() if k.startswith("pattern_")}
    assert len(patterns) == 7, sorted(patterns)
    for name, (weights, logs) in patterns.items():
        assert weights <= 1e-12 and logs <= 1e-12, (name, weights, logs)


def test_two_workers_train_asynchronously_and_end_alike(tmp_path, reference):
    first, second = _launch(tmp_path, workers=2)
    # Both read the same variables once fit has ended, so they evaluate and
    # save the same model.
    assert max_difference(saved_weights(first), saved_weights(second)) == 0.0
    np.testing.assert_array_equal(first["evaluated"], second["evaluated"])
    loaded = keras.models.load_model(tmp_path / "worker_1.keras")
    assert max_difference(loaded.get_weights(), saved_weights(first)) == 0.0
    # Each worker took one device's steps on half of every batch, and every
    # update of both reached the shared variables.
    steps = EPOCHS * SAMPLES // BATCH
    for result in (first, second):
        assert int(result["updates"]) == steps
        assert int(result["total_updates"]) == 2 * steps
        # The last epoch's logs hold the staleness of all the worker's updates.
        assert result["logged_staleness"][0][-1] == result["mean_staleness"]
        assert result["logged_staleness"][1][-1] == result["max_staleness"]
    # No update is lost when both write one variable at once: each of the
    # 2 x 32 SGD steps of the counting model took exactly 0.5 off.
    for result in (first, second):
        assert np.all(result["counted"] == -0.5 * 2 * SAMPLES // COUNTING_BATCH)
    # Asynchronous: not the one-device (or synchronous) result...
    assert max_difference(saved_weights(first), reference[0]) > 1e-3
    # ...but it trained as well on this easy task.
    assert first["evaluated"][0] < 1.2 * reference[2][0]
