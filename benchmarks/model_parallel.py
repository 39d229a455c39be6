"""Step time of PipelineParallel over single-device step time under `fit`.

An 8x1024 Dense MLP (64 inputs, Adam, global batch 256) on one device and
under PipelineParallel with 2 and 4 stages and 1, 4 and 8 micro-batches, all in
one process on 4 logical CPU devices. The setups take turns, one epoch each
and a different one first every round; each round gives every setup's epoch
time over the single device's in that round, and the figure is the median of
those ratios over `--repeats` rounds (after a warm-up epoch), which cancels
the machine's slow spells (epoch times here vary up to 2x between rounds).
Logical CPU devices share two cores, so the stages cannot run faster than
one device: what is measured is overhead. The largest share of weight plus
optimizer bytes on one device is read from `placement_report`.

Usage:
    python benchmarks/model_parallel.py               # full table, writes JSON
    python benchmarks/model_parallel.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import tables
from mlp import SAMPLES, build_mlp, make_data

BATCH, DEPTH, WIDTH = 256, 8, 1024
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import keras_parallel
    from keras_parallel.demo import epoch_times

    devices = keras_parallel.virtual_devices(4)
    import tensorflow as tf

    x, y = make_data()

    def build(strategy):
        model = build_mlp(strategy, DEPTH, WIDTH)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        return model

    setups = {(1, 1): tf.distribute.get_strategy()}
    for stages in (2, 4):
        for microbatches in (1, 4, 8):
            setups[(stages, microbatches)] = keras_parallel.PipelineParallel(
                devices[:stages], num_microbatches=microbatches
            )
    models = {key: build(strategy) for key, strategy in setups.items()}
    times = epoch_times(models, (x, y), BATCH, args.repeats)
    steps = SAMPLES // BATCH
    rows = []
    for (stages, microbatches), model in models.items():
        report = keras_parallel.placement_report(model)
        total = sum(t.total_bytes for t in report.devices.values())
        largest = max(t.total_bytes for t in report.devices.values())
        epochs = times[(stages, microbatches)]
        rows.append(
            {
                "stages": stages,
                "num_microbatches": microbatches,
                "step_ms": 1000 * statistics.median(epochs) / steps,
                "over_single": statistics.median(
                    t / s for t, s in zip(epochs, times[(1, 1)], strict=True)
                ),
                "largest_device_share": largest / total,
            }
        )
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "model_parallel.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(tables.render("model_parallel"), end="")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
