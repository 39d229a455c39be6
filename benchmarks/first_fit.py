"""How long the first `fit` of a convnet takes: one device, MirroredStrategy,
DataParallel.

The first `fit` of a process traces the train step, lets TensorFlow optimize
the graph and runs the first epoch; a notebook pays it on every run. Model:
`keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32,
3), classes=10)` (52 BatchNormalization layers), Adam, 512 generated
samples, batch 64, one epoch, 2 logical CPU devices. Each setting runs in
a fresh process (the tracing cost is per process) and the settings take turns
over the rounds. Timed: the first step (from the `fit` call to the end of
batch 0: trace, graph optimization and one step; also its CPU time, all
threads, which other processes on the machine disturb less), the rest of that
epoch, the first `fit` in all, and a second one-epoch `fit` for reference;
counted: the
nodes of the traced train step (function bodies included), which tracing and
TensorFlow's graph optimization take a time roughly proportional to.

Usage:
    python benchmarks/first_fit.py              # writes results/first_fit.json
    python benchmarks/first_fit.py --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import tables

SETTINGS = ("one device", "MirroredStrategy", "DataParallel")
SAMPLES, BATCH = 512, 64
TIMES = (
    "first_step_s",
    "first_step_cpu_s",
    "rest_of_epoch_s",
    "first_fit_s",
    "second_fit_s",
)

CHILD = """
import json, sys, time
import keras_parallel
devices = keras_parallel.virtual_devices(2)
import keras, numpy as np, tensorflow as tf

name, samples, batch = json.loads(sys.argv[1])
strategy = {
    "one device": tf.distribute.get_strategy,
    "MirroredStrategy": lambda: tf.distribute.MirroredStrategy(devices),
    "DataParallel": lambda: keras_parallel.DataParallel(devices),
}[name]()
keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.applications.MobileNetV2(
        weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=10
    )
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
rng = np.random.default_rng(0)
x = rng.random((samples, 32, 32, 3), dtype="float32")
y = rng.integers(0, 10, samples)


class FirstStep(keras.callbacks.Callback):
    # Not async-safe, so Keras hands it the batch's logs as numbers: the step
    # has finished when it is called.
    def on_train_batch_end(self, batch, logs=None):
        if batch == 0 and not hasattr(self, "end"):
            self.end, self.cpu = time.perf_counter(), time.process_time()


first = FirstStep()
start, start_cpu = time.perf_counter(), time.process_time()
model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[first])
end = time.perf_counter()
model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
again = time.perf_counter()


# The size of the step TensorFlow optimizes, traced again (untimed).
@tf.function
def step(x, y):
    return strategy.run(model.train_step, args=((x, y),))


graph = step.get_concrete_function(
    tf.constant(x[:batch]), tf.constant(y[:batch])
).graph.as_graph_def()
nodes = len(graph.node) + sum(len(f.node_def) for f in graph.library.function)
print(json.dumps({
    "step_nodes": nodes,
    "first_step_cpu_s": first.cpu - start_cpu,
    "first_step_s": first.end - start,
    "rest_of_epoch_s": end - first.end,
    "first_fit_s": end - start,
    "second_fit_s": again - end,
}))
"""


def run(name: str) -> dict[str, float]:
    """The times of one setting's first and second `fit`, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([name, SAMPLES, BATCH])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        # Each round starts with another setting, so that none always runs
        # first after the previous round's process.
        for name in SETTINGS[round_ % 3 :] + SETTINGS[: round_ % 3]:
            measured[name].append(run(name))
            print(round_, name, measured[name][-1], flush=True)
    rows = []
    for name in SETTINGS:
        row = {"setting": name}
        for key in TIMES:
            row[key] = statistics.median(m[key] for m in measured[name])
            # Each round's ratio to MirroredStrategy in that round: a slow
            # spell of the shared machine moves a whole round.
            row[key[: -len("_s")] + "_over_mirrored"] = statistics.median(
                m[key] / mirrored[key]
                for m, mirrored in zip(
                    measured[name], measured["MirroredStrategy"], strict=True
                )
            )
        # The same in every round: the graph does not depend on timing.
        row["step_nodes"] = measured[name][0]["step_nodes"]
        row["rounds"] = measured[name]
        rows.append(row)
    tables.publish(
        "first_fit",
        {
            "settings": {"rounds": args.rounds, "samples": SAMPLES, "batch": BATCH},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
