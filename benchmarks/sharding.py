"""Step time, bytes per device and traffic of DataParallel's sharding modes.

A 2 x 1024 ReLU MLP with Adam (64 inputs, 10 classes, 1.1 M parameters,
global batch 256) on one device and under `DataParallel(sharding=...)` with
None, "optimizer", "gradients" and "parameters" on 2 and 4 logical CPUs, all in one
process. The setups take turns, one epoch each and a different one first
every round; each round gives every setup's step time (the epoch's steps
after its first two, `ThroughputMonitor`) over the single device's in that
round, and the figure is the median of those ratios over `--repeats` rounds
(after a warm-up epoch). Logical CPU devices share two
cores, so what is measured is overhead, not speedup.

Bytes per device are those of the weights and optimizer state, read from
each variable's per-device copies (largest device). Traffic per step and
replica comes from `communication_stats()`: what each replica puts into
every collective of the step (its buffer of an all-reduce or reduce-scatter,
its part of an all-gather; the owner's broadcasts of what is not split by
rows), their total, and what a replica sends when each runs as a ring
(all-reduce 2(n-1)/n of its buffer, reduce-scatter (n-1)/n, all-gather n-1
parts).

Usage:
    python benchmarks/sharding.py               # full table (~2 min), writes JSON
    python benchmarks/sharding.py --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import tables
from mesh import MB, RESULTS, bytes_per_device
from mlp import SAMPLES, build_mlp, make_data

BATCH, DEPTH, WIDTH = 256, 2, 1024
MODES = (None, "optimizer", "gradients", "parameters")
# `communication_stats()` keys kept, as `<kind>bytes_per_step`: the total
# ("") and each kind of collective.
KINDS = ("", "all_reduce_", "reduce_scatter_", "all_gather_", "broadcast_", "ring_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import keras_parallel
    from keras_parallel.demo import epoch_times

    keras_parallel.virtual_devices(4)
    import tensorflow as tf

    x, y = make_data()
    setups = {"single device": (tf.distribute.get_strategy(), None, 1)}
    for n in (2, 4):
        for mode in MODES:
            strategy = keras_parallel.DataParallel(
                [f"CPU:{i}" for i in range(n)], sharding=mode
            )
            setups[f"sharding={mode!r}, {n} devices"] = (strategy, mode, n)

    models, stats = {}, {}
    for name, (strategy, _, _) in setups.items():
        model = build_mlp(strategy, DEPTH, WIDTH)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # warm-up
        models[name] = model
        report = getattr(strategy, "communication_stats", None)
        stats[name] = report() if report else None

    times = epoch_times(models, (x, y), BATCH, args.repeats, steady=True)

    rows = []
    for key, model in models.items():
        _, mode, n = setups[key]
        per_device = bytes_per_device(model)
        traffic = stats[key] or {}
        rows.append(
            {
                "setup": key,
                "sharding": mode,
                "devices": n,
                "over_single": statistics.median(
                    t / s
                    for t, s in zip(times[key], times["single device"], strict=True)
                ),
                "max_device_mb": max(per_device.values()) / MB,
                "bytes_per_device": per_device,
                **{
                    f"{kind}mb_per_step": traffic.get(f"{kind}bytes_per_step", 0) / MB
                    for kind in KINDS
                },
            }
        )
    result = {
        "settings": {
            "repeats": args.repeats,
            "model": f"{DEPTH}x{WIDTH} MLP, Adam",
            "global_batch": BATCH,
            "steps_per_epoch": SAMPLES // BATCH,
            "physical_cores": os.cpu_count(),
            "mb": "1e6 bytes",
        },
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "sharding.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(tables.render("sharding"), end="")


if __name__ == "__main__":
    main()
