"""ParameterServer's `variable_partitioner`, empty pieces of a batch and
endless datasets, on local clusters started by `keras-parallel launch --ps
K`; bad partitioners without a cluster."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from ps_cluster import launch
from ps_partitioned_task import BATCH, data, train
from transparency import max_difference, saved_weights

import keras_parallel

TASK = pathlib.Path(__file__).with_name("ps_partitioned_task.py")
PS = [f"/job:ps/replica:0/task:{k}/device:CPU:0" for k in range(2)]


def _launch(out, workers, *args, ps=2):
    return launch(TASK, out, workers, ps, *args)


def test_partitioned_embedding_equals_one_device(tmp_path):
    (result,) = _launch(tmp_path, 1)
    reference, history = train()
    assert max_difference(saved_weights(result), reference.get_weights()) <= 1e-5
    np.testing.assert_allclose(result["loss"], history.history["loss"], rtol=1e-5)
    x, y = data(64)
    evaluated = reference.evaluate(x, y, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(result["evaluated"], evaluated, rtol=1e-5)
    # The table's rows are split in two, one range on each ps task, and
    # Adam's state for it (momentum, velocity, average) alike.
    assert list(result["table_shards"]) == PS
    assert list(result["table_rows"]) == [20, 20]
    assert [list(s) for s in result["slot_shards"]] == [PS] * 3
    # In a training step each range is gathered (the forward pass) and
    # updated on its own ps task; only the gathered rows reach the worker.
    users = [u.split(" ") for u in result["shard_users"]]
    for index, device in enumerate(PS):
        assert {d for k, _, d in users if k == str(index)} == {device}, users
        assert (str(index), "ResourceGather", device) in map(tuple, users)
    assert list(result["to_worker"]) == ["ResourceGather (None, 4)"]
    # The Dropout's random state is the worker's own: no ps round trip.
    assert str(result["seed_variable"]).startswith("/job:worker")
    assert result["seed_users"].size
    assert not any("/job:ps" in u for u in result["seed_users"])
    assert float(result["round_trip"]) == 0.0
    # Saved from the row ranges, loaded whole with no strategy.
    loaded = keras.models.load_model(tmp_path / "worker_0.keras")
    assert max_difference(loaded.get_weights(), reference.get_weights()) == 0.0


def test_two_workers_skip_empty_pieces_and_refuse_endless_data(tmp_path):
    # 65 rows in batches of 8: each epoch ends with a batch of one row,
    # which leaves worker 0's piece empty. (One ps task holds both row
    # ranges of each split weight.)
    first, second = _launch(tmp_path, 2, "--samples", "65", ps=1)
    for result in (first, second):
        assert all(np.isfinite(w).all() for w in saved_weights(result))
        assert np.isfinite(result["loss"]).all()
    assert max_difference(saved_weights(first), saved_weights(second)) == 0.0
    np.testing.assert_array_equal(first["evaluated"], second["evaluated"])
    # Worker 0 skipped the update of each one-row batch; worker 1 did not.
    steps = 2 * 9
    assert int(first["updates"]) == steps - 2
    assert int(second["updates"]) == steps
    assert int(first["total_updates"]) == 2 * steps - 2
    for result in (first, second):
        assert "cannot train on an endless dataset" in str(result["endless"])
        assert "dataset.take(steps_per_epoch)" in str(result["endless"])
    # Endless validation data is fine: evaluation meets at its start, so
    # both workers validate the same weights.
    assert float(first["validated"]) == float(second["validated"])
    assert float(first["evaluated_after"]) == float(second["evaluated_after"])
    # A train_step of its own logs: no metrics to return for a skipped step,
    # and the message says what to change.
    for result in (first, second):
        assert "Return `self.get_metrics_result()`" in str(result["own_logs"])


@pytest.mark.parametrize(
    "partitioner, error, says",
    [
        (2, TypeError, "variable_partitioner=2"),
        (lambda shape: [1, 1], TypeError, "partitioner(shape, dtype)"),
        (lambda shape, dtype: 2, ValueError, "returned 2"),
        (lambda shape, dtype: [2], ValueError, "list of 2 positive integers"),
        (lambda shape, dtype: [0, 1], ValueError, "returned [0, 1]"),
        (lambda shape, dtype: [1, 2], ValueError, "first axis only"),
    ],
)
def test_bad_partitioner_is_refused_before_connecting(
    partitioner, error, says, monkeypatch
):
    # No cluster at all: the partitioner is checked first.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(error) as raised:
        keras_parallel.ParameterServer(variable_partitioner=partitioner)
    assert says in str(raised.value)
    assert "variable_partitioner" in str(raised.value)


def test_tensorflow_partitioners_are_accepted_before_connecting(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    partitioners = tf.distribute.experimental.partitioners
    for partitioner in (
        partitioners.MinSizePartitioner(),
        partitioners.FixedShardsPartitioner(2),
        partitioners.MaxSizePartitioner(max_shard_bytes=1024),
    ):
        # Past the partitioner, it is the missing cluster that stops it.
        with pytest.raises(ValueError, match="TF_CONFIG is not set"):
            keras_parallel.ParameterServer(variable_partitioner=partitioner)
