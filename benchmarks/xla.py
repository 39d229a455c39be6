"""Step time with and without XLA: one device (Keras' `jit_compile=True`)
against DataParallel (`jit_compile=True`: each replica compiled on its
device), on 2 logical CPU devices, under `fit`.

The four setups of a shape train side by side in one process, one epoch each
in turn, for `--rounds` rounds after a warm-up epoch; each figure is the
median over the rounds of the setup's epoch time over the uncompiled single
device's in the same round. It also counts the XLA clusters each device ran
in the train step (TensorFlow's executed graphs).

Usage:
    python benchmarks/xla.py            # results/xla.json, table in docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from mlp import SAMPLES, build_mlp, make_data
from tables import publish

BATCH = 256
SHAPES = ("2x1024", "2x16", "40x64")
SETUPS = ("one device", "one device + XLA", "DataParallel", "DataParallel + XLA")


def measure(shape: str, rounds: int) -> dict:
    """Runs in a worker process: the setups' epoch-time ratios and XLA runs."""
    import keras_parallel

    devices = keras_parallel.virtual_devices(2)
    import tensorflow as tf

    from keras_parallel._tf_internal import executed_graphs

    depth, width = (int(v) for v in shape.split("x"))
    x, y = make_data()
    models, clusters = {}, {}
    for name in SETUPS:
        if name.startswith("DataParallel"):
            strategy = keras_parallel.DataParallel(
                devices, jit_compile=name.endswith("XLA")
            )
        else:
            strategy = tf.distribute.get_strategy()
        model = build_mlp(strategy, depth, width)
        if name == "one device + XLA":
            model.jit_compile = True
        # TensorFlow reports a function's graphs when it first runs it.
        with executed_graphs() as graphs:
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        models[name] = model
        launches = [n.device for g in graphs for n in g.node if _launches_xla(n)]
        clusters[name] = {
            device.split("device:")[-1]: launches.count(device)
            for device in sorted(set(launches))
        }
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            times[name].append(time.perf_counter() - start)
    base = times["one device"]
    steps = SAMPLES // BATCH
    return {
        name: {
            "step_ms": 1000 * statistics.median(t) / steps,
            "over_single": statistics.median(
                a / b for a, b in zip(t, base, strict=True)
            ),
            "clusters": clusters[name],
        }
        for name, t in times.items()
    }


def _launches_xla(node) -> bool:
    """Whether an executed op launches a compiled cluster: an auto-clustered
    one, or a function compiled whole (Keras' `jit_compile=True`)."""
    must = node.attr.get("_XlaMustCompile")
    return node.op == "_XlaRun" or (must is not None and must.b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.rounds)))
        return
    rows = []
    for shape in SHAPES:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", shape, "--rounds", str(args.rounds)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for name in SETUPS:
            rows.append({"shape": shape, "setup": name, **result[name]})
    publish("xla", {"settings": {"rounds": args.rounds, "batch": BATCH}, "rows": rows})


if __name__ == "__main__":
    main()
