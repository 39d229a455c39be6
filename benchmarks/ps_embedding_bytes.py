"""Bytes a ParameterServer training step moves for an Embedding, with its
table whole on one ps task or split by rows over two (`variable_partitioner`).

Embedding(100000, 16) (a 6.4 MB table) -> Flatten -> Dense(1), SGD, batches
of 32 rows of 3 ids, 1 worker and 2 ps tasks started by `keras-parallel
launch --ps 2` in its private network namespace, where the loopback
interface carries the worker's and the ps tasks' traffic and nothing else.
The worker counts the loopback bytes (`/proc/self/net/dev`, received plus
sent: each byte on the wire counts twice) over 20 steps after a traced
warm-up step. Whole, Keras' `ops.take` reads the table into the worker every
step; split, each ps task gathers the rows the step's ids name.

Usage:
    python benchmarks/ps_embedding_bytes.py   # results/ps_embedding_bytes.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from launched import LAUNCHER, cluster_env

RESULTS = pathlib.Path(__file__).with_name("results") / "ps_embedding_bytes.json"
ROWS, WIDTH, BATCH, IDS, STEPS = 100_000, 16, 32, 3, 20


def _loopback_bytes() -> int:
    for line in pathlib.Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            fields = counters.split()
            return int(fields[0]) + int(fields[8])
    raise RuntimeError("no loopback interface in /proc/self/net/dev")


def worker(out: pathlib.Path, split: bool) -> None:
    """The task every process of the launched cluster runs."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_parallel

    partitioners = tf.distribute.experimental.partitioners
    strategy = keras_parallel.ParameterServer(
        variable_partitioner=partitioners.FixedShardsPartitioner(2) if split else None
    )
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((IDS,), dtype="int32"),
                keras.layers.Embedding(ROWS, WIDTH),
                keras.layers.Flatten(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.integers(0, ROWS, (BATCH * (STEPS + 1), IDS)).astype("int32")
    y = rng.normal(size=(len(x), 1)).astype("float32")
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    before = _loopback_bytes()
    model.fit(x[BATCH:], y[BATCH:], batch_size=BATCH, verbose=0, shuffle=False)
    per_step = (_loopback_bytes() - before) / STEPS
    out.write_text(json.dumps({"loopback_bytes_per_step": per_step}))


def main() -> None:
    results = {"table_bytes": ROWS * WIDTH * 4, "ids_per_step": BATCH * IDS}
    env = cluster_env()
    with tempfile.TemporaryDirectory() as folder:
        for name, flag in (("whole", []), ("split", ["--split"])):
            out = pathlib.Path(folder) / f"{name}.json"
            subprocess.run(
                [*LAUNCHER, "--ps", "2", "-n", "1", __file__, "--out", str(out), *flag],
                check=True,
                env=env,
                timeout=600,
            )
            results[name] = json.loads(out.read_text())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if "TF_CONFIG" in os.environ:
        args = sys.argv[1:]
        worker(pathlib.Path(args[args.index("--out") + 1]), "--split" in args)
    else:
        main()
