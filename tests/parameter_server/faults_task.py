"""The task of the ParameterServer fault tests, run in every process.

`python faults_task.py OUT MODEL [options]` with `TF_CONFIG` set: a ps task
serves; a worker trains MODEL under `ParameterServer()` and writes
`OUT/<name>.npz`, name `worker_<i>` or `--name`:

- `count`: ps_task's counting model, whose kernel counts the updates that
  reached the ps; saves `kernel`, this worker's `updates` and the
  `total_updates` of all workers after `fit`.
- `mlp`: ps_task's MLP with Adam; saves the weights, the losses and the
  epochs it ran.

Options make the faults: `--die-at E:B` (SIGKILL itself before batch B of
epoch E), `--hold-at E` (after epoch E, wait until `OUT/rejoined` exists),
`--announce` (create `OUT/rejoined` once the strategy exists), `--signal-at
E:B` (create `OUT/ready_<i>` before batch B of epoch E), `--slow S` (sleep S
seconds before each batch), `--backup DIR` (keras_parallel's
BackupAndRestore), `--swallow` (catch the error that ends `fit`, then
block), `--stall W:E` (worker W sleeps in `on_epoch_end` of epoch E).
Warnings are printed with the time they were issued.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from ps_task import counting_data, counting_model, train  # noqa: E402

COUNT_SAMPLES = 64
COUNT_BATCH = 8


def stamped(message, category, filename, lineno, file=None, line=None):
    print(f"[{time.time():.3f}] {category.__name__}: {message}", file=sys.stderr)


def at(text: str) -> tuple[int, int]:
    epoch, batch = text.split(":")
    return int(epoch), int(batch)


class Faults(keras.callbacks.Callback):
    """Does what the options say, at the epoch and batch they say."""

    def __init__(self, args, strategy):
        super().__init__()
        self.args = args
        self.strategy = strategy
        self.epoch = 0
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epochs.append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        args, where = self.args, (self.epoch, batch)
        if args.signal_at and where == at(args.signal_at):
            ready = args.out / f"ready_{self.strategy.worker_index}"
            ready.write_text(str(time.time()))
        if args.die_at and where == at(args.die_at):
            updates = self.strategy.communication_stats()["updates"]
            print(f"dying after {updates} updates at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.slow:
            time.sleep(args.slow)

    def on_epoch_end(self, epoch, logs=None):
        if self.args.stall and at(self.args.stall) == (
            self.strategy.worker_index,
            epoch,
        ):
            print(f"stalling after epoch {epoch}", flush=True)
            time.sleep(120)
        if self.args.hold_at is not None and epoch == self.args.hold_at:
            deadline = time.monotonic() + 120
            while not (self.args.out / "rejoined").exists():
                assert time.monotonic() < deadline, "nobody rejoined"
                time.sleep(0.05)


def count(strategy, faults, epochs):
    model = counting_model(strategy)
    x, y = counting_data(COUNT_SAMPLES)
    model.fit(
        x, y, batch_size=COUNT_BATCH, epochs=epochs, callbacks=[faults], verbose=0
    )
    stats = strategy.communication_stats()
    return {
        "kernel": model.get_weights()[0],
        "updates": stats["updates"],
        "total_updates": stats["total_updates"],
    }


def mlp(strategy, faults, epochs, backup):
    import keras_parallel

    callbacks = [faults]
    if backup:
        callbacks.append(keras_parallel.callbacks.BackupAndRestore(backup))
    model, history = train(strategy, epochs, callbacks)
    weights = {f"arr_{i}": w for i, w in enumerate(model.get_weights())}
    return {**weights, "loss": history.history["loss"], "epochs": faults.epochs}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("model", choices=["count", "mlp"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--name")
    parser.add_argument("--die-at")
    parser.add_argument("--hold-at", type=int)
    parser.add_argument("--announce", action="store_true")
    parser.add_argument("--signal-at")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--backup")
    parser.add_argument("--swallow", action="store_true")
    parser.add_argument("--stall")
    args = parser.parse_args()
    warnings.showwarning = stamped
    import keras_parallel

    strategy = keras_parallel.ParameterServer()
    print(strategy, flush=True)
    if args.announce:
        (args.out / "rejoined").write_text(str(time.time()))
    faults = Faults(args, strategy)
    if args.model == "count":
        result = count(strategy, faults, args.epochs)
    elif args.swallow:
        try:
            mlp(strategy, faults, args.epochs, args.backup)
        except Exception as error:  # noqa: BLE001 - what a careless script does
            print(f"caught {type(error).__name__}", flush=True)
        # Blocked, as the next TensorFlow operation on a ps that is gone can
        # be (it waits for the ps to come back), which no test can provoke
        # at will.
        time.sleep(120)
    else:
        result = mlp(strategy, faults, args.epochs, args.backup)
    name = args.name or f"worker_{strategy.worker_index}"
    np.savez(args.out / f"{name}.npz", **result)


if __name__ == "__main__":
    main()
