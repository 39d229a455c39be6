"""Keras' file-writing callbacks, with their files written once on a cluster.

Under a multi-worker strategy every worker runs the user's script, so each
runs its own copy of every callback. Keras 3's callbacks never consult the
strategy: two `BackupAndRestore` or `ModelCheckpoint` write the same HDF5
file at once (and one fails, "unable to lock file"), two `CSVLogger` write
rows into one file and two `TensorBoard` an event file each into one folder.
tf.keras 2 let the chief write and the others write to a temporary folder;
Keras 3 has no such convention. These subclasses restore it.

On one worker (no strategy, or a strategy on one machine) they are Keras'
callbacks unchanged.
"""

from __future__ import annotations

import contextlib
import os

import keras
import numpy as np

from keras_parallel._tf_internal import BACKUP_WEIGHTS_PATH
from keras_parallel.callbacks.chief_files import Scratch, Workers, pointed_at
from keras_parallel.collective_saves import every_worker_saves


class ChiefWrites:
    """What our file-writing callbacks share: worker 0 writes the files, the
    others write what they must to a folder of their own that is thrown away,
    and every worker's `fit` returns once the files are complete."""

    def set_model(self, model: keras.Model) -> None:
        """Keras' `Callback.set_model`; also finds this worker's place."""
        super().set_model(model)
        self._join(model)

    def _join(self, model: keras.Model) -> None:
        self._workers = Workers(model)
        if not hasattr(self, "_scratch"):
            self._scratch = Scratch(self._workers.index)

    @property
    def _throwaway(self) -> bool:
        """Whether this worker's writes are thrown away (it is not the chief)."""
        return self._workers.several and not self._workers.writes

    @property
    def _silent(self) -> bool:
        """Whether this worker saves nothing at all: not the chief, under
        ParameterServer (its saves would read the variables the chief's
        save reads, and join no collective)."""
        return self._throwaway and self._workers.share_variables

    def _all_done(self) -> None:
        # Called after the chief's last write of `fit`: whatever a worker
        # reads once `fit` returns (the checkpoint, the CSV) is complete.
        if self._workers.several:
            self._workers.wait_for_all("the end of worker 0's files")


class BackupAndRestore(ChiefWrites, keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for training on several workers:
    worker 0 alone writes the backup, and every worker resumes from it.

    The other workers save too, into a temporary folder of their own that is
    deleted (a save can read variables through collectives all workers must
    join). When `fit` starts, every worker restores from `backup_dir`, and
    they check that they restored the same training step: `backup_dir` must be
    a folder all workers read (one machine, or a shared filesystem). The
    backup holds PowerSGD's error memory summed over all workers (each
    keeps its own; only their sum enters the next steps), so a resumed run
    continues as the uninterrupted one. On one worker this is Keras'
    callback unchanged.

    Args:
        backup_dir: Folder of the backup, read by every worker.
        save_freq: `"epoch"`, or a number of batches between backups.
        double_checkpoint: Whether to keep the previous backup too.
        delete_checkpoint: Whether to delete the backup when `fit` ends.

    Example:

    ```python
    strategy = keras_parallel.DataParallel()  # keras-parallel launch -n 2
    with strategy.scope():
        model = ...  # build and compile
    model.fit(x, y, epochs=10, callbacks=[
        keras_parallel.callbacks.BackupAndRestore("/shared/backup"),
    ])
    ```
    """

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._writer = None
        if self._throwaway and not self._silent:
            self._writer = keras.callbacks.BackupAndRestore(
                self._scratch.path(),
                save_freq=self.save_freq,
                double_checkpoint=self.double_checkpoint,
            )
            self._writer.set_model(model)

    def on_train_begin(self, logs=None) -> None:
        if self._workers.restores:
            super().on_train_begin(logs)
        else:
            # The variables are trained already (ParameterServer): take the
            # epoch to resume at, and leave the weights as they are.
            with pointed_at(self, BACKUP_WEIGHTS_PATH, os.devnull + ".absent"):
                super().on_train_begin(logs)
        if self._workers.several and not self._workers.share_variables:
            self._check_restored()

    def _check_restored(self) -> None:
        steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        found = self._workers.gather(steps)
        if len(set(found)) > 1:
            raise ValueError(
                f"BackupAndRestore: the workers restored different training "
                f"states from backup_dir={self.backup_dir!r} (optimizer steps "
                f"per worker: {found}). Worker 0 writes the backup and every "
                "worker reads it, so `backup_dir` must be a folder all workers "
                "see: on one machine any folder, across machines one on a "
                "shared filesystem."
            )

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._pass_on("on_train_batch_end", batch, logs)

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._pass_on("on_epoch_end", epoch, logs)

    def on_train_end(self, logs=None) -> None:
        self._pass_on("on_train_end", logs)
        self._scratch.clear()
        self._all_done()

    def _pass_on(self, method: str, *args) -> None:
        """Keras' `method`, saving where this worker saves: the chief into
        `backup_dir`, another worker into its scratch folder, or nowhere
        under ParameterServer."""
        if self._silent:
            return
        keras_callback = super() if self._writer is None else self._writer
        with every_worker_saves():
            getattr(keras_callback, method)(*args)


class ModelCheckpoint(ChiefWrites, keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` for training on several workers:
    worker 0 alone writes the checkpoints.

    The other workers save too, into a temporary folder of their own emptied
    after each save (a save can read variables through collectives all
    workers must join). With `save_best_only`, every worker takes worker 0's
    value of `monitor`, so all decide alike. Every worker's `fit` returns
    once the last checkpoint is complete. On one worker this is Keras'
    callback unchanged.

    Args:
        filepath: Where to save (`.keras`, `.h5`, or `.weights.h5` with
            `save_weights_only`); may hold `{epoch}` and log fields.
        monitor: The log to monitor for `save_best_only`.
        verbose: 1 to print a line per save.
        save_best_only: Whether to save only when `monitor` improves.
        save_weights_only: Whether to save the weights only.
        mode: `"auto"`, `"min"` or `"max"`: which way `monitor` improves.
        save_freq: `"epoch"`, or a number of batches between saves.
        initial_value_threshold: The value of `monitor` to improve on first.

    Example:

    ```python
    checkpoint = keras_parallel.callbacks.ModelCheckpoint(
        "/shared/best.keras", monitor="val_loss", save_best_only=True
    )
    model.fit(x, y, validation_split=0.1, epochs=10, callbacks=[checkpoint])
    ```
    """

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self.save_freq == "epoch":
            super().on_train_batch_end(batch, logs)
            return
        if not self._silent:
            with self._written_here():
                super().on_train_batch_end(batch, self._agreed(logs))

    def on_epoch_end(self, epoch, logs=None) -> None:
        if not self._silent:
            with self._written_here():
                super().on_epoch_end(epoch, self._agreed(logs))

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        self._all_done()

    @contextlib.contextmanager
    def _written_here(self):
        """Every worker saves at once; on a worker other than the chief, to
        its scratch folder, emptied afterwards."""
        if not self._throwaway:
            with every_worker_saves():
                yield
            return
        path = os.path.join(self._scratch.path(), os.path.basename(self.filepath))
        try:
            with pointed_at(self, "filepath", path), every_worker_saves():
                yield
        finally:
            self._scratch.clear()

    def _agreed(self, logs):
        """`logs` with worker 0's value of `monitor`, for `save_best_only`."""
        if not (self._workers.several and self.save_best_only and logs):
            return logs
        if self._workers.share_variables:
            return logs  # the chief alone saves
        value = logs.get(self.monitor)
        if value is None or np.ndim(value) != 0:
            return logs  # Keras warns and saves anyway, on every worker
        chief = self._workers.gather(float(value))[0]
        return {**logs, self.monitor: chief}


class CSVLogger(ChiefWrites, keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` for training on several workers: worker 0
    alone writes the file, with one row per epoch (every worker logs the same
    numbers). Every worker's `fit` returns once the file is complete. On one
    worker this is Keras' callback unchanged.

    Args:
        filename: The CSV file, e.g. `"run/log.csv"`.
        separator: The string between values.
        append: Whether to append to an existing file rather than replace it.

    Example:

    ```python
    model.fit(x, y, epochs=10, callbacks=[
        keras_parallel.callbacks.CSVLogger("run/log.csv"),
    ])
    ```
    """

    def on_train_begin(self, logs=None) -> None:
        if not self._throwaway:
            super().on_train_begin(logs)
            return
        # Writing rows reads no variable: the others' rows go nowhere.
        with pointed_at(self, "filename", os.devnull):
            super().on_train_begin(logs)

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        self._all_done()


class TensorBoard(ChiefWrites, keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` for training on several workers: worker 0
    alone writes into `log_dir`, so TensorBoard shows one run (one event file
    per folder) rather than one per worker.

    The other workers write the same summaries, histograms and profiles into
    a temporary folder of their own, removed at the end of `fit` (writing
    embeddings saves the model, which can read variables through collectives
    all workers must join). On one worker this is Keras' callback unchanged.

    Args:
        log_dir: The folder of the logs.
        histogram_freq: Epochs between histograms of the weights (0: none).
        write_graph: Whether to write the graph of the model.
        write_images: Whether to write the weights as images.
        write_steps_per_second: Whether to log steps per second.
        update_freq: `"epoch"`, `"batch"`, or batches between logs.
        profile_batch: Batch (or `(start, stop)`) to profile; 0 for none.
        embeddings_freq: Epochs between embedding visualisations (0: none).
        embeddings_metadata: Metadata of the embedding layers.

    Example:

    ```python
    model.fit(x, y, epochs=10, callbacks=[
        keras_parallel.callbacks.TensorBoard("run/logs"),
    ])
    ```
    """

    def set_model(self, model: keras.Model) -> None:
        """Keras' `TensorBoard.set_model`, with the folder this worker writes."""
        self._join(model)  # before Keras names its writers' folders
        if not self._throwaway:
            super().set_model(model)
            return
        # Keras reads `log_dir` here only, to name its writers' folders.
        with pointed_at(self, "log_dir", self._scratch.path()):
            super().set_model(model)

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        if self._throwaway:
            self._scratch.clear()
        self._all_done()
