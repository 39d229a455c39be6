"""DataParallel's fixed cost per step: its step time over one device's.

Dense MLPs (`depth x width`, Adam, global batch 256): 2x16, 40x64 and
2x1024 on 2 logical CPUs and 2x1024 on 4, each configuration in its own
process (the device layout is fixed per process, and MirroredStrategy cannot
be re-created for another model shape in one, tensorflow/tensorflow#62790).
In a process one device, one device computing the step's gradient as two
half-batch gradients (`HalvesMLP`: the ops of two replicas' forward and
backward, without any communication, what any data-parallel step runs),
DataParallel (its default, `sharding="auto"`), DataParallel with
`sharding="optimizer"` (every weight's Adam state split by rows, the default
before) and MirroredStrategy take turns, one `fit(epochs=1)` each and a
different one first every round, after a warm-up epoch. Per round and
setup:

- epoch: the epoch's wall time inside `fit` (from `on_epoch_begin` to its
  last step: the epoch's iterator and its steps), per step;
- steps: the steps alone (each from `on_train_batch_begin` to its end: the
  call of the compiled train function), per step;
- fit: the whole `fit` call, per step: also what Keras does once per call
  (its data adapter, and under any strategy a first batch read and reduced
  to build the model symbolically);
- CPU: the epoch's CPU time of the process (all threads), per step, which a
  busy machine moves less than wall time.

A ratio is the median over the rounds of each round's ratio to one device,
so a slow spell, which moves every setup of its round, cancels. The whole
measurement runs `--runs` times (each configuration's process once per run);
a row gives the median of the runs' ratios and their range. Ops per step
count the traced `train_step` (`graph_memory.traced_train_step`), without
constants and no-ops: the work a small model's step is made of.

Usage:
    python benchmarks/overhead.py                        # results/overhead.json
    python benchmarks/overhead.py --runs 1 --rounds 3    # quick check (same file)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import keras
import tables
from mlp import SAMPLES, build_mlp, make_data

BATCH = 256
CONFIGS = (("2x16", 2), ("40x64", 2), ("2x1024", 2), ("2x1024", 4))
SETUPS = (
    "single",
    "single_halves",
    "DataParallel",
    "DataParallel_optimizer",
    "MirroredStrategy",
)
# The ratios a row gives the median and range of over the runs.
RATIOS = tuple(
    f"{name}_over_single_{kind}"
    for name in SETUPS[1:]
    for kind in ("epoch", "steps", "fit", "cpu")
)
# Graph nodes that do no work when the step runs.
_NOT_RUN = {"Const", "NoOp", "Placeholder"}


def step_ops(model, x, y) -> int:
    """Ops of one traced `train_step` of `model` on batches shaped like
    `x` and `y` (nested functions included), without `_NOT_RUN`."""
    from keras_parallel import graph_memory
    from keras_parallel._tf_internal import graph_functions

    def count(graph) -> int:
        own = sum(op.type not in _NOT_RUN for op in graph.get_operations())
        return own + sum(count(inner) for inner in graph_functions(graph))

    return count(graph_memory.traced_train_step(model, x, y))


class HalvesMLP(keras.Sequential):
    """An MLP whose step sums the gradients of its batch's two halves (each
    loss halved, so the sum is the whole batch's gradient): on one device,
    the forward and backward ops of two replicas, without communication."""

    @classmethod
    def like(cls, model: keras.Sequential) -> HalvesMLP:
        halves = cls(model.layers)
        halves.compile(optimizer=model.optimizer, loss=model.loss)
        return halves

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        half = tf.shape(x)[0] // 2
        gradients = None
        for part in (slice(None, half), slice(half, None)):
            with tf.GradientTape() as tape:
                predicted = self(x[part], training=True)
                loss = self.compute_loss(x=x[part], y=y[part], y_pred=predicted) / 2
            part_gradients = tape.gradient(loss, self.trainable_variables)
            gradients = (
                part_gradients
                if gradients is None
                else [a + b for a, b in zip(gradients, part_gradients, strict=True)]
            )
        self.optimizer.apply(gradients, self.trainable_variables)
        return {"loss": loss}


def measure(shape: str, num_devices: int, rounds: int) -> dict:
    """Runs in a worker process: the figures of one configuration."""
    import keras_parallel

    devices = keras_parallel.virtual_devices(num_devices)
    import tensorflow as tf

    depth, width = (int(v) for v in shape.split("x"))
    x, y = make_data()
    strategies = {
        "single": tf.distribute.get_strategy(),
        "single_halves": tf.distribute.get_strategy(),
        "DataParallel": keras_parallel.DataParallel(devices),
        "DataParallel_optimizer": keras_parallel.DataParallel(
            devices, sharding="optimizer"
        ),
        "MirroredStrategy": tf.distribute.MirroredStrategy(devices),
    }
    models = {}
    for name, strategy in strategies.items():
        models[name] = build_mlp(strategy, depth, width)
        if name == "single_halves":
            models[name] = HalvesMLP.like(models[name])
        models[name].fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    ops = {
        name: step_ops(models[name], x[:BATCH], y[:BATCH])
        for name in SETUPS
        if name != "MirroredStrategy"  # its own trace would take new collectives
    }
    steps = SAMPLES // BATCH
    times = {name: {"epoch": [], "steps": [], "fit": [], "cpu": []} for name in SETUPS}
    for r in range(rounds):
        for name in SETUPS[r % len(SETUPS) :] + SETUPS[: r % len(SETUPS)]:
            clocks = {"epoch": time.perf_counter, "cpu": time.process_time}
            clocks = {kind: EpochClock(clock) for kind, clock in clocks.items()}
            start = time.perf_counter()
            models[name].fit(
                x,
                y,
                batch_size=BATCH,
                epochs=1,
                verbose=0,
                callbacks=list(clocks.values()),
            )
            times[name]["fit"].append(1000 * (time.perf_counter() - start) / steps)
            for kind, clock in clocks.items():
                times[name][kind].append(1000 * clock.seconds / steps)
            times[name]["steps"].append(1000 * clocks["epoch"].in_steps / steps)
    return {"ops": ops, "times": times}


class EpochClock(keras.callbacks.Callback):
    """Seconds by `clock` from an epoch's start to its last step's end
    (`seconds`), and in its steps (`in_steps`)."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.clock()
        self.in_steps = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.step_start = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        self.in_steps += now - self.step_start
        self.seconds = now - self.start


def summarize(shape: str, num_devices: int, measured: dict) -> dict:
    """One row of the table from a worker's figures."""
    times, ops = measured["times"], measured["ops"]
    single = times["single"]

    def over_single(name, kind):
        pairs = zip(times[name][kind], single[kind], strict=True)
        return statistics.median(t / s for t, s in pairs)

    row = {"model": shape, "devices": num_devices}
    for name in SETUPS:
        row[f"{name}_ms"] = statistics.median(times[name]["epoch"])
        row[f"{name}_ops"] = ops.get(name)
        if name != "single":
            for kind in ("epoch", "steps", "fit", "cpu"):
                row[f"{name}_over_single_{kind}"] = over_single(name, kind)
    row["times_ms"] = times
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, n = args.worker
        print(json.dumps(measure(shape, int(n), args.rounds)))
        return
    runs = {config: [] for config in CONFIGS}
    for run in range(args.runs):
        for shape, n in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--rounds", str(args.rounds)]
                + ["--worker", shape, str(n)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            runs[shape, n].append(summarize(shape, n, measured))
            print(
                f"run {run + 1}, {shape} on {n}: DataParallel / single "
                f"{runs[shape, n][-1]['DataParallel_over_single_epoch']:.2f}",
                flush=True,
            )
    tables.publish(
        "overhead",
        {
            "settings": {
                "runs": args.runs,
                "rounds": args.rounds,
                "global_batch": BATCH,
                "steps_per_epoch": SAMPLES // BATCH,
                "physical_cores": os.cpu_count(),
            },
            "rows": [over_runs(config_runs) for config_runs in runs.values()],
        },
    )


def over_runs(config_runs: list[dict]) -> dict:
    """One configuration's row: the first run's row with each of `RATIOS`
    the median over the runs, its range under `<ratio>_range`, and every
    run's row under `runs`."""
    row = {key: value for key, value in config_runs[0].items() if key != "times_ms"}
    for ratio in RATIOS:
        values = [run[ratio] for run in config_runs]
        row[ratio] = statistics.median(values)
        row[f"{ratio}_range"] = [min(values), max(values)]
    row["runs"] = config_runs
    return row


if __name__ == "__main__":
    main()
