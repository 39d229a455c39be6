"""keras_parallel.callbacks' file-writing callbacks on two launched workers:
worker 0 alone writes, the files are whole and readable; Keras' own get a
warning, and their collision an explanation (resuming from a backup:
test_multi_worker.py)."""

import csv

import keras
import numpy as np
import tensorflow as tf
from test_multi_worker import _launch, _results, _weights

from keras_parallel.data_parallel.file_collisions import LOCK_MESSAGE


def scalars(path, tag):
    """{step: value} of scalar `tag` in an event file."""
    return {
        event.step: float(tf.make_ndarray(value.tensor))
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
        if value.tag == tag
    }


def test_files_are_written_once_by_worker_zero(tmp_path):
    files, scratch = tmp_path / "files", tmp_path / "tmp"
    scratch.mkdir()
    # Gradient accumulation: saving reads its sync-on-read accumulators
    # through a collective, which worker 1 must join.
    done = _launch(
        tmp_path / "out",
        *("--files", str(files), "--optimizer-options"),
        TMPDIR=str(scratch),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = _results(tmp_path / "out")
    assert np.array_equal(first["loss"], second["loss"])
    losses = first["loss"].tolist()
    improved = [
        e + 1 for e, v in enumerate(losses) if v < min(losses[:e], default=np.inf)
    ]
    written = sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file())
    events = [name for name in written if "tfevents" in name]
    assert written == sorted(
        [f"best_{epoch}.keras" for epoch in improved]
        + ["keras_0.csv", "keras_1.csv", "last.keras", "log.csv", *events]
    )
    # One event file (worker 1's went to its temporary folder, now removed).
    assert len(events) == 1 and events[0].startswith("logs/train/")
    assert list(scratch.iterdir()) == []
    # The checkpoint is worker 0's final model.
    saved = keras.models.load_model(files / "last.keras").get_weights()
    for a, b in zip(saved, _weights(first), strict=True):
        np.testing.assert_array_equal(a, b)
    # The CSV has each epoch once, the rows Keras' own logger wrote on each
    # worker.
    text = (files / "log.csv").read_text()
    assert text == (files / "keras_0.csv").read_text()
    assert text == (files / "keras_1.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert [float(row["loss"]) for row in rows] == losses
    logged = scalars(files / events[0], "epoch_loss")
    np.testing.assert_allclose([logged[e] for e in range(3)], losses, rtol=1e-7)
    # Keras' own CSVLogger was named, once on each worker; ours were not.
    for worker in (0, 1):
        warned = [
            line
            for line in done.stderr.splitlines()
            if line.startswith(f"[worker {worker}] ") and "UserWarning" in line
        ]
        assert len(warned) == 1, done.stderr[-3000:]
        assert "keras.callbacks.CSVLogger runs on every worker" in warned[0]
        assert "Use keras_parallel.callbacks.CSVLogger" in warned[0]


def test_two_workers_saving_one_hdf5_file_are_told_what_to_use(tmp_path):
    # Worker 0 holds the file open, as while it saves; worker 1's Keras
    # ModelCheckpoint saves to it at the end of epoch 0.
    done = _launch(tmp_path / "out", "--lock", str(tmp_path / "lock"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "[worker 0] holding the file open" in done.stdout
    assert "unable to lock file" in done.stderr
    assert f"[worker 1] {LOCK_MESSAGE}" in done.stderr.splitlines()
    for name in ("BackupAndRestore", "ModelCheckpoint", "CSVLogger", "TensorBoard"):
        assert f"keras_parallel.callbacks.{name}" in LOCK_MESSAGE
    assert "keras.callbacks.ModelCheckpoint runs on every worker" in done.stderr
