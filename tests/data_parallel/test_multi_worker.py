"""DataParallel across worker processes on loopback, started by
`keras-parallel launch` (or by hand, to see what one worker does when the
other dies). Every process is bounded by a timeout."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import LAUNCH_TIMEOUT, cluster_env, launch_task
from multi_worker_task import OUTER_OPTIMIZER, compression, data, train
from transparency import devices, worker_results
from transparency import max_difference as _max_difference
from transparency import saved_weights as _weights

import keras_parallel
from keras_parallel.launch import free_ports

TASK = pathlib.Path(__file__).with_name("multi_worker_task.py")


def _launch(out, *args, workers=2, options=(), task=TASK, **env):
    """Runs `task` (the training task) on `workers` launched workers
    (`options`: the launcher's, `env`: extra variables)."""
    return launch_task(task, out, *args, workers=workers, options=options, **env)


def _results(out, workers=2):
    return worker_results(out, workers)


@pytest.fixture(scope="module")
def reference():
    """Single-process training with the same global batch."""
    model, history, _, batch_losses, batch_misses = train(epochs=3)
    predictions = model.predict(data()[0][:100], batch_size=32, verbose=0)
    return (
        model.get_weights(),
        history.history["loss"],
        predictions,
        batch_losses,
        batch_misses,
    )


# One launch trains every configuration, each under a DataParallel of its own
# in the same two workers, as a notebook cell run again makes one (each reuses
# the workers' servers; TensorFlow's start-up in each process is most of a
# launch's cost); each is then held to one process's result.
CONFIGURATIONS = {
    "plain": (),
    "optimizer_options": ("--optimizer-options",),
    "bf16": ("--compression", "bf16"),
    "sharding_gradients": ("--sharding", "gradients"),
    "sharding_parameters": ("--sharding", "parameters"),
    "local_sgd": ("--sync-every", "4"),
    "diloco": ("--sync-every", "4", "--outer"),
    "split_embedding": ("--sharding", "parameters", "--embedding"),
    "powersgd": ("--compression", "powersgd"),
    "fp16": ("--compression", "fp16"),
    "uneven_last_batch": ("--samples", "250"),
}
FP32_BYTES = 4 * (8 * 16 + 2 * 16 + 16 + 1)  # gradients: 8x16, BN 2x16, 16+1


def test_configurations_across_workers_equal_one_process(tmp_path, reference):
    args = []
    for k, options in enumerate(CONFIGURATIONS.values()):
        args += [*(["--then"] if k else []), *options]
    done = _launch(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {
        name: _results(tmp_path / f"run_{k}" if k else tmp_path)
        for k, name in enumerate(CONFIGURATIONS)
    }
    for name, (first, second) in results.items():
        # Every worker ends with the same weights.
        assert _max_difference(_weights(first), _weights(second)) == 0.0, name
    _plain(done, *results["plain"], reference)
    _optimizer_options(results["optimizer_options"][0])
    _bf16(results["bf16"][0], reference)
    for sharding in ("gradients", "parameters"):
        _sharding(results[f"sharding_{sharding}"][0], reference)
    for name in ("local_sgd", "diloco"):
        _periodic_averaging(results[name][0], outer=name == "diloco")
    _split_embedding(results["split_embedding"][0])
    for name in ("powersgd", "fp16"):
        _compressed_as_one_process_with_as_many_replicas(results[name][0], name)
    _uneven_last_batch(results["uneven_last_batch"][0])


def _plain(done, first, second, reference):
    assert "[worker 0] DataParallel(worker 0 of 2, 2 replicas)" in done.stdout
    assert "[worker 1] DataParallel(worker 1 of 2, 2 replicas)" in done.stdout
    assert int(first["num_workers"]) == 2
    # Dense + BatchNormalization (statistics over the global batch) + Adam.
    assert _max_difference(_weights(first), reference[0]) <= 1e-5
    np.testing.assert_allclose(first["loss"], reference[1], rtol=1e-5)
    # Every step logs the whole batch's metrics, the same on every worker.
    np.testing.assert_array_equal(first["batch_losses"], second["batch_losses"])
    np.testing.assert_allclose(first["batch_losses"], reference[3], rtol=1e-5)
    # A count too (each worker holds part of it).
    np.testing.assert_array_equal(first["batch_misses"], second["batch_misses"])
    np.testing.assert_array_equal(first["batch_misses"], reference[4])
    # Each worker predicted its share of every batch; Keras gathers them all.
    for result in (first, second):
        assert result["predictions"].shape == (100, 1)
        np.testing.assert_allclose(result["predictions"], reference[2], atol=1e-5)
    # The gradients went through our engine.
    assert int(first["bytes_per_step"]) == FP32_BYTES


def _optimizer_options(first):
    model, _, *_ = train(optimizer_options=True)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5


def _bf16(first, reference):
    assert int(first["bytes_per_step"]) == FP32_BYTES // 2  # bfloat16 on the wire
    # bfloat16 keeps 8 bits of mantissa: close to, not equal to, float32.
    assert 0 < _max_difference(_weights(first), reference[0]) < 0.05


def _sharding(first, reference):
    # Each worker splits over its own devices (one CPU here) and the
    # reduce-scatter sums over both workers' replicas.
    assert _max_difference(_weights(first), reference[0]) <= 1e-5
    np.testing.assert_allclose(first["loss"], reference[1], rtol=1e-5)
    assert int(first["bytes_per_step"]) == FP32_BYTES


def _periodic_averaging(first, outer):
    # Each worker's replica steps alone; every 4 steps the changes are summed
    # over both workers by TensorFlow's collectives.
    strategy = keras_parallel.DataParallel(
        devices(2), sync_every=4, outer_optimizer=OUTER_OPTIMIZER if outer else None
    )
    model, history, *_ = train(strategy)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5
    np.testing.assert_allclose(first["loss"], history.history["loss"], rtol=1e-5)
    weights = 4 * (8 * 16 + 2 * 16 + 2 * 16 + 16 + 1)  # BN's moving statistics too
    assert float(first["bytes_per_step"]) == weights / 4


def _split_embedding(first):
    # The embedding's sparse gradient is gathered from both workers and each
    # worker keeps its rows, still sparse (Adam's per-row update as on one
    # device).
    model, history, *_ = train(embedding=True)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5
    np.testing.assert_allclose(first["loss"], history.history["loss"], rtol=1e-5)


def _compressed_as_one_process_with_as_many_replicas(first, name):
    # One process, two replicas, the same global batch: PowerSGD's error
    # memory must be each replica's share of what the sum over ALL workers'
    # replicas missed, and fp16's scale must be agreed over all of them.
    strategy = keras_parallel.DataParallel(devices(2), compression=compression(name))
    model, history, *_ = train(strategy)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5
    np.testing.assert_allclose(first["loss"], history.history["loss"], rtol=1e-5)
    assert (
        int(first["bytes_per_step"]) == strategy.communication_stats()["bytes_per_step"]
    )


def _uneven_last_batch(first):
    # 250 samples in batches of 32 end with a batch of 26, 13 per worker.
    model, history, *_ = train(epochs=3, samples=250)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5
    np.testing.assert_allclose(first["loss"], history.history["loss"], rtol=1e-5)


def test_killed_worker_stops_the_other_with_a_clear_error(tmp_path):
    # Started by hand, without the launcher (which would stop worker 0
    # itself): worker 0 must notice on its own that worker 1 is gone.
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = cluster_env()
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        workers.append(
            subprocess.Popen(
                [sys.executable, str(TASK), str(tmp_path), "--epochs", "1000"]
                + ["--die-at", "1:1:3"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    try:
        _, _ = workers[1].communicate(timeout=LAUNCH_TIMEOUT)
        assert workers[1].returncode == -9
        # Worker 0 must stop on its own, not hang in the collective.
        _, stderr = workers[0].communicate(timeout=60)
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode != 0
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "keras_parallel.data_parallel.lost_workers.WorkerFailedError: A worker of "
        "the cluster is gone"
    ), stderr[-3000:]
    assert "/job:worker/replica:0/task:1" in last_line
    assert keras_parallel.WorkerFailedError.__module__ in last_line


def test_steps_per_execution_above_one_is_refused_clearly(tmp_path):
    done = _launch(tmp_path, "--steps-per-execution", "4")
    assert done.returncode == 1
    assert "Received: steps_per_execution=4" in done.stderr
    assert "Compile with `steps_per_execution=1`" in done.stderr


def test_first_batch_must_split_evenly_across_workers(tmp_path):
    done = _launch(tmp_path, "--batch-size", "33")
    assert done.returncode == 1
    assert "The first global batch has 33 samples" in done.stderr
    assert "a multiple of 2" in done.stderr


@pytest.mark.parametrize("callback", ["--keras-backup", "--backup"])
def test_powersgd_memory_survives_a_killed_worker(tmp_path, callback):
    # Keras' callback: each worker saves and restores its own error memory;
    # ours: worker 0 saves the sum over both workers, which each restores
    # half of; either continues as the uninterrupted run.
    backup = tmp_path / "backup"
    args = ("--compression", "powersgd", callback, str(backup))
    first_try = _launch(tmp_path / "1", *args, "--die-at", "1:2:1")
    assert first_try.returncode == 137, first_try.stderr[-3000:]
    second_try = _launch(tmp_path / "2", *args)
    assert second_try.returncode == 0, second_try.stderr[-3000:]
    first, second = _results(tmp_path / "2")
    assert first["epochs"].tolist() == [2]
    assert _max_difference(_weights(first), _weights(second)) == 0.0
    # The run ends as the uninterrupted one (= one process with 2 replicas).
    strategy = keras_parallel.DataParallel(
        devices(2), compression=compression("powersgd")
    )
    model, _, *_ = train(strategy)
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5


# Sample 40 is in the second batch (32 per batch), in worker 0's half of it.
NAN_SAMPLE = 40


def test_a_nan_on_one_worker_stops_every_worker_at_the_same_batch(tmp_path):
    done = _launch(tmp_path, "--nan-sample", str(NAN_SAMPLE), "--terminate-on-nan")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = _results(tmp_path)
    # The loss is the global batch's: NaN on both workers at batch 1, where
    # TerminateOnNaN stops each of them, as on one device.
    _, _, _, batch_losses, _ = train(
        nan_sample=NAN_SAMPLE, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    assert len(batch_losses) == 2 and np.isnan(batch_losses[1])
    for result in (first, second):
        assert len(result["batch_losses"]) == 2
        assert np.isnan(result["batch_losses"][1])


def test_a_nan_on_one_worker_makes_the_loss_scale_skip_the_step_everywhere(tmp_path):
    done = _launch(tmp_path, "--nan-sample", str(NAN_SAMPLE), "--loss-scale")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = _results(tmp_path)
    assert _max_difference(_weights(first), _weights(second)) == 0.0
    assert all(np.isfinite(w).all() for w in _weights(first))
    # The same skipped steps as one process with 2 replicas.
    model, *_ = train(
        keras_parallel.DataParallel(devices(2)),
        nan_sample=NAN_SAMPLE,
        loss_scale=True,
    )
    assert _max_difference(_weights(first), model.get_weights()) <= 1e-5
    # Each epoch's NaN batch halved the scale: 3 skipped steps.
    scale = next(v for v in model.optimizer.variables if "dynamic_scale" in v.path)
    assert float(scale.numpy()) == 2.0**15 / 2**3
