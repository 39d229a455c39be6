"""Bytes per step, accuracy and step time of each gradient compression.

Runs the two tasks the tests assert on (`tests/reduction/compression_tasks.py`): the
demo convnet (Adam, 3 epochs) and a 40x64 Dense MLP (SGD with momentum,
8 epochs), on 2 logical CPU devices, for every setting. Bytes are what each
replica sends per step (`DataParallel.communication_stats()`); step time is
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

# (task, label, compression): PowerSGD settings as keyword items, as the
# tests pass them.
SETTINGS = [
    ("demo convnet", "none", None),
    ("demo convnet", "fp16", "fp16"),
    ("demo convnet", "bf16", "bf16"),
    ("demo convnet", "PowerSGD(4)", (("rank", 4),)),
    (
        "demo convnet",
        "PowerSGD(4), fp16 P/Q",
        (("rank", 4), ("transfer_dtype", "float16")),
    ),
    ("40x64 MLP", "none", None),
    ("40x64 MLP", "fp16", "fp16"),
    ("40x64 MLP", "bf16", "bf16"),
    ("40x64 MLP", "PowerSGD(4), warmup 64", (("rank", 4), ("warmup_steps", 64))),
    (
        "40x64 MLP",
        "PowerSGD(4), warmup 64, fp16 P/Q",
        (("rank", 4), ("warmup_steps", 64), ("transfer_dtype", "float16")),
    ),
]


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
        settings = [(label, c) for t, label, c in SETTINGS if t == task]
        runs = {}
        for label, compression in settings:
            print(f"training {task}, {label}", flush=True)
            runs[label] = run(compression)
        first = runs["none"]
        rates = samples_per_second(
            {label: r["model"] for label, r in runs.items()},
            first["data"],
            batch_size=128,
            rounds=args.repeats,
        )
        for label, result in runs.items():
            stats = result["stats"]
            rows.append(
                {
                    "task": task,
                    "compression": label,
                    "bytes_per_step": stats["bytes_per_step"],
                    "fp32_bytes_per_step": stats["fp32_bytes_per_step"],
                    "warmup_bytes_per_step": stats["warmup_bytes_per_step"],
                    "reductions": stats["reductions"],
                    "accuracy": result["accuracy"],
                    "step_time_ratio": rates["none"] / rates[label],
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
