"""A small training job run by the multi-worker tests, in every worker.

As a script (`python multi_worker_task.py OUT [options]`, with `TF_CONFIG`
set by `keras-parallel launch`) it trains under `DataParallel()` and writes
`OUT/worker_<i>.npz`: the weights, the loss per epoch, the epochs it ran and
`bytes_per_step`. `train` is also called without a strategy by the tests, as
the single-process reference.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 32
SAMPLES = 256


def data(samples=SAMPLES):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.1 * x[:, :1]).astype("float32")
    return x, y


def build(steps_per_execution=1, optimizer_options=False, loss_scale=False):
    keras.utils.set_random_seed(1)
    # Clipping, moving averages and accumulation: they must see the gradient
    # of the whole global batch.
    options = (
        dict(
            clipnorm=0.1,
            use_ema=True,
            ema_overwrite_frequency=3,
            gradient_accumulation_steps=2,
        )
        if optimizer_options
        else {}
    )
    model = keras.Sequential(
        [
            keras.Input((8,)),
            # No bias before BatchNormalization: it would cancel it, and Adam
            # turns the rounding noise of its zero gradient into steps.
            keras.layers.Dense(16, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(1),
        ]
    )
    optimizer = keras.optimizers.Adam(0.01, **options)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss="mse",
        # A count: each worker's replicas hold part of it, the logs the sum.
        metrics=[keras.metrics.FalseNegatives(thresholds=0.5, name="misses")],
        steps_per_execution=steps_per_execution,
    )
    return model


def token_ids(x):
    """Four ids in [0, 50) per sample, for the embedding model."""
    return (np.abs(x[:, :4]) * 10).astype("int32") % 50


def build_embedding():
    """A model whose largest weight takes sparse gradients."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(50, 8),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def compression(name: str | None):
    """`DataParallel(compression=...)` for the `--compression` option:
    `"powersgd"` is rank 1 after 2 uncompressed steps (the 8x16 kernel is
    compressed, the rest is summed exactly)."""
    if name == "powersgd":
        import keras_parallel

        return keras_parallel.PowerSGD(rank=1, warmup_steps=2)
    return name


class _Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []

        self.batch_losses: list[float] = []
        self.batch_misses: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.batch_losses.append(float(logs["loss"]))
        self.batch_misses.append(float(logs.get("misses", np.nan)))


class _Die(keras.callbacks.Callback):
    """Kills this process with SIGKILL at a batch of an epoch: a crashed worker."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self._epoch, self._batch, self._current = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._current, batch) == (self._epoch, self._batch):
            print(f"killing myself at epoch {self._epoch}, batch {batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def file_callbacks(folder: str, worker: int) -> list:
    """Our file-writing callbacks, all writing into `folder`, and Keras' own
    CSVLogger writing a file per worker (it gets a warning)."""
    import keras_parallel

    # CSVLogger, as Keras', makes no folder.
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    return [
        keras_parallel.callbacks.ModelCheckpoint(
            f"{folder}/best_{{epoch}}.keras", monitor="loss", save_best_only=True
        ),
        keras_parallel.callbacks.ModelCheckpoint(f"{folder}/last.keras"),
        keras_parallel.callbacks.CSVLogger(f"{folder}/log.csv"),
        keras_parallel.callbacks.TensorBoard(f"{folder}/logs", histogram_freq=1),
        keras.callbacks.CSVLogger(f"{folder}/keras_{worker}.csv"),
    ]


class _FirstAttemptFault(keras.callbacks.Callback):
    """On the launcher's first attempt only: exits at the start of a batch of
    an epoch (a crashed worker), or sleeps at its end (a stalled one)."""

    def __init__(self, epoch: int, batch: int, stall: bool):
        super().__init__()
        self._at, self._stall, self._current = (epoch, batch), stall, -1
        self._first = os.environ.get("KERAS_PARALLEL_RESTART_COUNT") == "0"

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._first and not self._stall and (self._current, batch) == self._at:
            print(f"exiting at epoch {self._current}, batch {batch}", flush=True)
            os._exit(3)

    def on_train_batch_end(self, batch, logs=None):
        if self._first and self._stall and (self._current, batch) == self._at:
            print(f"stalling after epoch {self._current}, batch {batch}", flush=True)
            time.sleep(120)


class _HoldOpen(keras.callbacks.Callback):
    """Holds an HDF5 file open for writing during `fit`, as a worker does
    while it saves it."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def on_train_begin(self, logs=None):
        import h5py

        self._file = h5py.File(self._path, "w")
        print("holding the file open", flush=True)

    def on_train_end(self, logs=None):
        self._file.close()


def lock_callbacks(folder: str, worker: int) -> list:
    """Worker 0 holds `folder/model.weights.h5` open while worker 1's Keras
    ModelCheckpoint saves to it: the collision of two workers' saves,
    whichever comes first."""
    path = f"{folder}/model.weights.h5"
    if worker == 0:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        return [_HoldOpen(path)]
    return [keras.callbacks.ModelCheckpoint(path, save_weights_only=True)]


# DiLoCo's outer optimizer (Douillard et al. 2023), as a config: a Keras
# optimizer instance would start TensorFlow before the strategy.
OUTER_OPTIMIZER = {
    "class_name": "SGD",
    "config": {"learning_rate": 0.7, "momentum": 0.9, "nesterov": True},
}


def train(
    strategy=None,
    epochs=3,
    callbacks=(),
    print_epochs=False,
    steps_per_execution=1,
    samples=SAMPLES,
    batch_size=GLOBAL_BATCH,
    optimizer_options=False,
    nan_sample=None,
    loss_scale=False,
    embedding=False,
):
    """Trains; returns (model, history, epochs run, the loss logged per batch,
    the count of `misses` logged per batch).

    `nan_sample`: index of a sample whose target is NaN (its loss and every
    gradient of its batch are NaN).
    """
    x, y = data(samples)
    if nan_sample is not None:
        y[nan_sample] = np.nan
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        if embedding:
            x, model = token_ids(x), build_embedding()
        else:
            model = build(steps_per_execution, optimizer_options, loss_scale)
    record = _Record()
    printer = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: print(f"epoch {epoch} done", flush=True)
    )
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[*callbacks, record, *([printer] if print_epochs else [])],
    )
    return model, history, record.epochs, record.batch_losses, record.batch_misses


def main(argv: list[str]) -> int:
    """`OUT [options] [--then options ...]`: one training run per group of
    options, each under a DataParallel of its own in the same workers (as a
    notebook creates one per cell); run k > 0 writes to `OUT/run_k`."""
    out, *rest = argv
    groups = [[]]
    for arg in rest:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    for k, group in enumerate(groups):
        run(parse([out if k == 0 else f"{out}/run_{k}", *group]))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--backup", default=None, help="BackupAndRestore folder")
    parser.add_argument(
        "--keras-backup", default=None, help="Keras' BackupAndRestore, per worker"
    )
    parser.add_argument("--files", default=None, help="folder of file callbacks")
    parser.add_argument("--lock", default=None, help="HDF5 file two workers open")
    parser.add_argument("--die-at", default=None, help="worker:epoch:batch")
    parser.add_argument(
        "--exit-at", default=None, help="worker:epoch:batch, first attempt only"
    )
    parser.add_argument(
        "--stall-at", default=None, help="worker:epoch:batch, first attempt only"
    )
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--optimizer-options", action="store_true")
    parser.add_argument("--nan-sample", type=int, default=None)
    parser.add_argument("--loss-scale", action="store_true")
    parser.add_argument("--terminate-on-nan", action="store_true")
    parser.add_argument("--sharding", default="auto")
    parser.add_argument("--sync-every", type=int, default=1)
    parser.add_argument("--outer", action="store_true", help="DiLoCo's Nesterov")
    parser.add_argument("--embedding", action="store_true")
    parser.add_argument("--collective-timeout", type=float, default=None)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    import keras_parallel

    strategy = keras_parallel.DataParallel(
        compression=compression(args.compression),
        sharding=None if args.sharding == "none" else args.sharding,
        sync_every=args.sync_every,
        outer_optimizer=OUTER_OPTIMIZER if args.outer else None,
        **(
            {"collective_timeout": args.collective_timeout}
            if args.collective_timeout
            else {}
        ),
    )
    print(f"{strategy!r}", flush=True)
    callbacks = []
    if args.backup:
        # One folder, written by worker 0, read by all.
        callbacks.append(keras_parallel.callbacks.BackupAndRestore(args.backup))
    if args.keras_backup:
        # Keras' own: one folder per worker, each saving its own state.
        callbacks.append(
            keras.callbacks.BackupAndRestore(
                f"{args.keras_backup}/worker_{strategy.worker_index}"
            )
        )
    if args.files:
        callbacks += file_callbacks(args.files, strategy.worker_index)
    if args.lock:
        callbacks += lock_callbacks(args.lock, strategy.worker_index)
    if args.terminate_on_nan:
        callbacks.append(keras.callbacks.TerminateOnNaN())
    if args.die_at:
        worker, epoch, batch = map(int, args.die_at.split(":"))
        if worker == strategy.worker_index:
            callbacks.append(_Die(epoch, batch))
    for fault, stall in ((args.exit_at, False), (args.stall_at, True)):
        if fault:
            worker, epoch, batch = map(int, fault.split(":"))
            if worker == strategy.worker_index:
                callbacks.append(_FirstAttemptFault(epoch, batch, stall))
    model, history, epochs, batch_losses, batch_misses = train(
        strategy,
        args.epochs,
        callbacks,
        True,
        args.steps_per_execution,
        args.samples,
        args.batch_size,
        args.optimizer_options,
        args.nan_sample,
        args.loss_scale,
        args.embedding,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / f"worker_{strategy.worker_index}.npz",
        *model.get_weights(),
        predictions=model.predict(
            token_ids(data()[0][:100]) if args.embedding else data()[0][:100],
            batch_size=GLOBAL_BATCH,
            verbose=0,
        ),
        loss=np.array(history.history["loss"]),
        epochs=np.array(epochs),
        batch_losses=np.array(batch_losses),
        batch_misses=np.array(batch_misses),
        bytes_per_step=strategy.communication_stats()["bytes_per_step"],
        num_workers=strategy.num_workers,
        restart_count=int(os.environ.get("KERAS_PARALLEL_RESTART_COUNT", "0")),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
