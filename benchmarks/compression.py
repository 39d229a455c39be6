"""Bytes per step, accuracy and step time of each gradient compression.

Runs the two tasks the tests assert on (`tests/reduction/compression_tasks.py`): the
demo convnet (Adam, 3 epochs) and a 40x64 Dense MLP (SGD with momentum,
8 epochs), on 2 logical CPU devices, for every setting. Bytes are what each
replica puts into every collective of a step (`communication_stats()`: the
gradients' reduction and, with a sharding of the optimizer state, the
all-gather of the updated weights, which is never compressed), and the
compression ratio is that total over the same step's with `compression=None`;
step time is
the median of `--repeats` further epochs, the settings of a task taking turns
so that machine noise hits them alike, over the uncompressed setting's.

Usage:
    python benchmarks/compression.py               # full table, writes JSON
    python benchmarks/compression.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import tables

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# (task, label, compression, sharding): PowerSGD settings as keyword items,
# as the tests pass them. "auto" is the default: the optimizer state split
# without compression, whole on every device with one (the all-gather it
# would add is not compressed); the PowerSGD row with "optimizer" shows that
# all-gather's bytes.
SETTINGS = [
    ("demo convnet", "none", None, "auto"),
    ("demo convnet", "none", None, None),
    ("demo convnet", "fp16", "fp16", "auto"),
    ("demo convnet", "bf16", "bf16", "auto"),
    ("demo convnet", "PowerSGD(4)", (("rank", 4),), "auto"),
    ("demo convnet", "PowerSGD(4)", (("rank", 4),), "optimizer"),
    (
        "demo convnet",
        "PowerSGD(4), fp16 P/Q",
        (("rank", 4), ("transfer_dtype", "float16")),
        "auto",
    ),
    ("40x64 MLP", "none", None, "auto"),
    ("40x64 MLP", "fp16", "fp16", "auto"),
    ("40x64 MLP", "bf16", "bf16", "auto"),
    (
        "40x64 MLP",
        "PowerSGD(4), warmup 64",
        (("rank", 4), ("warmup_steps", 64)),
        "auto",
    ),
    (
        "40x64 MLP",
        "PowerSGD(4), warmup 64, fp16 P/Q",
        (("rank", 4), ("warmup_steps", 64), ("transfer_dtype", "float16")),
        "auto",
    ),
]


# What each row keeps of `communication_stats()`.
STATS = (
    "bytes_per_step",
    "all_reduce_bytes_per_step",
    "all_gather_bytes_per_step",
    "broadcast_bytes_per_step",
    "uncompressed_bytes_per_step",
    "compression_ratio",
    "ring_bytes_per_step",
    "warmup_bytes_per_step",
    "reductions",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import keras_parallel

    keras_parallel.virtual_devices(2)
    tests = os.path.join(HERE, os.pardir, "tests")
    sys.path[:0] = [tests, os.path.join(tests, "reduction")]
    import compression_tasks

    from keras_parallel.demo import samples_per_second

    tasks = {
        "demo convnet": compression_tasks.demo_convnet,
        "40x64 MLP": compression_tasks.deep_mlp,
    }
    rows = []
    for task, run in tasks.items():
        runs = {}
        for t, label, compression, sharding in SETTINGS:
            if t != task:
                continue
            print(f"training {task}, {label}, sharding={sharding!r}", flush=True)
            options = {} if sharding == "auto" else {"sharding": sharding}
            runs[label, sharding] = run(compression, **options)
        rates = samples_per_second(
            {key: r["model"] for key, r in runs.items()},
            runs["none", "auto"]["data"],
            batch_size=128,
            rounds=args.repeats,
        )
        for (label, sharding), result in runs.items():
            stats = result["stats"]
            rows.append(
                {
                    "task": task,
                    "compression": label,
                    "sharding": sharding,
                    **{key: stats[key] for key in STATS},
                    "accuracy": result["accuracy"],
                    "step_time_ratio": rates["none", "auto"] / rates[label, sharding],
                }
            )
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "compression.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print()
    print(tables.render("compression"), end="")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
