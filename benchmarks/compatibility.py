"""Which Keras features give single-device numbers under each strategy.

Each feature trains a small seeded MLP for 2 epochs (batch 64, 256 samples) on
one device, under MirroredStrategy, DataParallel and PipelineParallel on the same
2 logical CPUs, and compares the weights with one device: a cell is ✔ when
the largest difference is at most 1e-5 (float32 rounding of a reordered sum
moves these weights by < 1e-6), the difference when larger, or the error.
Each feature runs in its own process, so that MirroredStrategy is created
once per process (re-created for another model shape it fails,
tensorflow/tensorflow#62790, which would blame later rows for earlier ones).

Usage:
    python benchmarks/compatibility.py              # the table, into results/
    python benchmarks/compatibility.py "`clipnorm`" # one row, as JSON
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOLERANCE = 1e-5
NUM_DEVICES = 2


STRATEGIES = ["MirroredStrategy", "DataParallel", "PipelineParallel"]


def main() -> None:
    from features import FEATURES

    rows = {}
    for name in FEATURES:
        done = subprocess.run(
            [sys.executable, __file__, name],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if done.returncode:
            sys.exit(f"{name}: the worker process failed\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    table = markdown(rows, STRATEGIES)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compatibility.json"), "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    with open(os.path.join(RESULTS, "compatibility.md"), "w") as f:
        f.write(table + "\n")


def row(name: str) -> dict:
    """Runs one feature on one device and under each strategy (in this
    process, which has just split its CPU)."""
    import keras_parallel

    keras_parallel.virtual_devices(NUM_DEVICES)
    import features

    feature = features.FEATURES[name]
    reference = feature(None)
    makers = {
        "MirroredStrategy": features.mirrored,
        "DataParallel": features.data_parallel,
        "PipelineParallel": features.model_parallel,
    }
    return {s: cell(feature, makers[s], reference) for s in STRATEGIES}


def cell(feature, make_strategy, reference) -> str:
    import numpy as np
    import tensorflow as tf

    try:
        weights = feature(make_strategy())
    except Exception as error:  # noqa: BLE001 - the table reports any failure
        text = str(error).strip()
        # A TensorFlow runtime error's cause follows its status code
        # ("INVALID_ARGUMENT:  You must feed ..."), after the traceback.
        cause = re.search(r"\b[A-Z_]{5,}:\s+(.+)", text)
        if isinstance(error, tf.errors.OpError) and cause:
            line = cause.group(1)
        else:
            line = text.splitlines()[0] if text else ""
        return f"{type(error).__name__}: {line.strip()[:90]}"
    for a, b in zip(weights, reference, strict=True):
        if np.shape(a) != np.shape(b):
            return f"shape {np.shape(a)} where one device gives {np.shape(b)}"
    diff = max(
        float(np.max(np.abs(a - b))) for a, b in zip(weights, reference, strict=True)
    )
    return "✔" if diff <= TOLERANCE else f"{diff:.1e}"


def markdown(rows: dict, strategies: list[str]) -> str:
    lines = [
        "| feature | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
    ]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells[s] for s in strategies) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if len(sys.argv) > 1:
        print(json.dumps(row(sys.argv[1]), ensure_ascii=False))
    else:
        main()
