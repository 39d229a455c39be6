"""Whether `keras.RematScope` keeps its memory saving under the strategies.

6 x Dense(512, gelu) on 512 inputs, SGD, batch 16384, built with and without
`keras.RematScope(mode="activations")` (GELU's intermediates recomputed in
the backward), on one device, under DataParallel (2 logical CPU devices) and
under PipelineParallel (2 stages). Each setting runs in a fresh process:
after a warm-up step (which traces), the peak of the bytes TensorFlow's host
allocator holds over 2 steps minus what it holds before them (the logical
devices share that allocator, so this is the process's tensor memory).

Usage:
    python benchmarks/remat.py      # writes results/remat.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import tables

STRATEGIES = ("one device", "DataParallel", "PipelineParallel")

CHILD = """
import json, sys
import keras_parallel
keras_parallel.virtual_devices(2)
import keras, numpy as np, tensorflow as tf

name, remat = json.loads(sys.argv[1])
strategy = {
    "one device": tf.distribute.get_strategy,
    "DataParallel": keras_parallel.DataParallel,
    "PipelineParallel": keras_parallel.PipelineParallel,
}[name]()
keras.utils.set_random_seed(0)
with strategy.scope():
    inputs = keras.Input((512,))
    hidden = inputs
    with keras.RematScope(mode="activations" if remat else None):
        for _ in range(6):
            hidden = keras.layers.Dense(512, activation="gelu")(hidden)
    model = keras.Model(inputs, hidden)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
x = np.random.default_rng(0).normal(size=(16384, 512)).astype("float32")
model.train_on_batch(x, x)
tf.config.experimental.reset_memory_stats("CPU:0")
before = tf.config.experimental.get_memory_info("CPU:0")["current"]
model.train_on_batch(x, x)
model.train_on_batch(x, x)
peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
print(json.dumps({"peak_growth": peak - before}))
"""


def run(name: str, remat: bool) -> int:
    """Peak growth of one setting, measured in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([name, remat])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    peaks: dict[tuple[str, bool], list[int]] = {}
    for _ in range(args.rounds):
        for name in STRATEGIES:
            for remat in (False, True):
                peaks.setdefault((name, remat), []).append(run(name, remat))
    rows = []
    for name in STRATEGIES:
        plain = statistics.median(peaks[name, False]) / 2**20
        remat = statistics.median(peaks[name, True]) / 2**20
        rows.append(
            {
                "strategy": name,
                "peak_growth_mb": plain,
                "peak_growth_remat_mb": remat,
                "remat_over_plain": remat / plain,
            }
        )
    tables.publish("remat", {"settings": {"rounds": args.rounds}, "rows": rows})


if __name__ == "__main__":
    main()
