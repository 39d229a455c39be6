"""Samples/s of DataParallel on 2 worker processes (one thread each) over one
process with two threads, on this machine's two cores; and the same workers
meeting every 8 steps (`sync_every=8`, local SGD) instead of every step.

Each setup trains a Dense MLP (64 inputs, Adam, global batch 256, 4096
samples) for a warm-up epoch and `--epochs` timed epochs; its figure is the
median epoch's samples/s. The workers are started by `keras-parallel launch`
on loopback, so they pay for gRPC and the collective ring, but not for a
network. The setups take turns for `--repeats` rounds; the ratio is the median
of the per-round ratios (epoch times here swing up to 2x between rounds).

Usage:
    python benchmarks/multi_worker.py              # writes results/multi_worker.json
    python benchmarks/multi_worker.py --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import tables
from launched import LAUNCHER, cluster_env
from mlp import SAMPLES, build_mlp, epoch_timer, make_data

BATCH = 256
SHAPES = ((2, 1024), (8, 256))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_setup(
    depth: int, width: int, threads: int, epochs: int, out: str, sync_every: int
) -> None:
    """One process's part: trains and writes its median samples/s to `out`."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)

    import keras_parallel

    if "TF_CONFIG" in os.environ:
        strategy = keras_parallel.DataParallel(sync_every=sync_every)
    else:
        strategy = tf.distribute.get_strategy()
    x, y = make_data()
    model = build_mlp(strategy, depth, width)
    times: list[float] = []
    timer = epoch_timer(times)
    model.fit(x, y, batch_size=BATCH, epochs=epochs + 1, verbose=0, callbacks=[timer])
    if getattr(strategy, "worker_index", 0) == 0:
        with open(out, "w") as f:
            json.dump({"samples_per_second": SAMPLES / statistics.median(times[1:])}, f)


def measure(depth, width, workers, epochs, folder, sync_every=1) -> float:
    """Samples/s of one setup, each in fresh processes."""
    out = os.path.join(folder, "result.json")
    script = [os.path.abspath(__file__), "--setup", str(depth), str(width)]
    script += [str(2 // workers), str(epochs), out, str(sync_every)]
    env = cluster_env()
    if workers == 1:
        command = [sys.executable, *script]
    else:
        command = [*LAUNCHER, "-n", str(workers), *script]
    subprocess.run(command, check=True, env=env, timeout=900)
    with open(out) as f:
        return json.load(f)["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--setup", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        depth, width, threads, epochs, out, sync_every = args.setup
        run_setup(
            int(depth), int(width), int(threads), int(epochs), out, int(sync_every)
        )
        return

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for depth, width in SHAPES:
            single, multi, local, ratios, local_ratios = [], [], [], [], []
            for round_ in range(args.repeats):
                # Rotate which setup goes first, against slow spells.
                setups = [(1, 1), (2, 1), (2, 8)]
                setups = setups[round_ % 3 :] + setups[: round_ % 3]
                speed = {
                    (w, h): measure(depth, width, w, args.epochs, folder, h)
                    for w, h in setups
                }
                single.append(speed[1, 1])
                multi.append(speed[2, 1])
                local.append(speed[2, 8])
                ratios.append(speed[2, 1] / speed[1, 1])
                local_ratios.append(speed[2, 8] / speed[2, 1])
            rows.append(
                {
                    "model": f"{depth}x{width}",
                    "one_process_two_threads": statistics.median(single),
                    "two_workers_one_thread": statistics.median(multi),
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                    "two_workers_sync_every_8": statistics.median(local),
                    "sync_every_8_over_every_step": statistics.median(local_ratios),
                    "sync_every_8_ratios": local_ratios,
                }
            )
            print(
                f"{depth}x{width}: 1 process x 2 threads "
                f"{statistics.median(single):,.0f} samples/s, 2 workers x 1 thread "
                f"{statistics.median(multi):,.0f} samples/s, ratio "
                f"{statistics.median(ratios):.2f} (rounds: "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + f"); sync_every=8 {statistics.median(local):,.0f} samples/s, "
                f"{statistics.median(local_ratios):.2f}x every step's",
                flush=True,
            )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "multi_worker.json"), "w") as f:
        json.dump({"batch": BATCH, "samples": SAMPLES, "rows": rows}, f, indent=2)
    print(tables.render("multi_worker"), end="")


if __name__ == "__main__":
    main()
