"""ParameterServer (asynchronous, 2 ps tasks) against synchronous DataParallel
across the same number of launched workers, and against one device: held-out
accuracy per seed, staleness, and the whole job's training samples/s.

The task (`keras_parallel.demo.teacher_task`, as `local_sgd.py`'s): 32
Gaussian inputs labelled by a random teacher network (10 classes), 16,384
training and 4,096 held-out samples; a student MLP (2 x 128, ReLU) with Adam
(1e-3) learns it from 4 epochs of global batch 128. Under ParameterServer
every worker takes each step on its own 1/n of every batch and updates the
variables on the ps tasks without waiting; under DataParallel the n workers
all-reduce every step's gradients. Every process (worker or ps) runs one
intra-op and one inter-op thread; all of them share this machine's cores, on
loopback, so the figures show the runtimes' overheads, not a network.

A job's samples/s is the training samples of an epoch over the median epoch
time of epochs 2 to 4 on worker 0 (epoch 1 traces the step; under
ParameterServer an epoch ends when every worker has finished it). The
setups take turns in rounds, round k training seed k, the first to go
rotating; a ratio is the median of the per-round ratios.

Usage:
    python benchmarks/parameter_server.py            # ~3 min a seed, 5 seeds; writes
                                                     # results/parameter_server.json
    python benchmarks/parameter_server.py --seeds 1  # quick check
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
from launched import LAUNCHER, REPORT_PREFIX, cluster_env
from mlp import build_student, epoch_timer

FEATURES, CLASSES, TRAIN, HELD_OUT = 32, 10, 16384, 4096
BATCH, EPOCHS = 128, 4
PS_TASKS = 2
WORKERS = (2, 4)
STRATEGIES = ("ParameterServer", "DataParallel")
ATTEMPTS = 3


def run_task(strategy_name: str, seed: int, out: str) -> None:
    """One process's part: trains seed `seed`'s model under the strategy
    (`one device`: none) and writes what it measured to
    `out/worker_<i>.json`; a ps task serves instead and never returns."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import keras_parallel
    from keras_parallel.demo import teacher_task

    if strategy_name == "ParameterServer":
        strategy = keras_parallel.ParameterServer()
    elif strategy_name == "DataParallel":
        strategy = keras_parallel.DataParallel()
    else:
        strategy = tf.distribute.get_strategy()
    (x, y), (x_test, y_test) = teacher_task(TRAIN, HELD_OUT, seed, FEATURES, CLASSES)
    keras.utils.set_random_seed(seed)
    model = build_student(strategy, FEATURES, CLASSES)
    times: list[float] = []
    timer = epoch_timer(times)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    found = {
        "accuracy": accuracy,
        "samples_per_second": TRAIN / statistics.median(times[1:]),
    }
    if strategy_name == "ParameterServer":
        found.update(strategy.communication_stats())
    index = getattr(strategy, "worker_index", 0)
    with open(os.path.join(out, f"worker_{index}.json"), "w") as f:
        json.dump(found, f)


def measure(
    strategy_name: str, workers: int, seed: int, folder: str, failures: list[dict]
) -> list[dict]:
    """What each worker of one fresh job measured. A job that fails is run
    again (at most `ATTEMPTS` times in all), and its failure is added to
    `failures`, with what the launcher said of it."""
    env = cluster_env()
    for _ in range(ATTEMPTS):
        out = tempfile.mkdtemp(dir=folder)
        script = [os.path.abspath(__file__), "--task", strategy_name, str(seed), out]
        if strategy_name == "one device":
            command = [sys.executable, *script]
        else:
            ps = PS_TASKS if strategy_name == "ParameterServer" else 0
            command = [*LAUNCHER, "--ps", str(ps), "-n", str(workers), *script]
        done = subprocess.run(
            command, env=env, timeout=1800, stderr=subprocess.PIPE, text=True
        )
        if done.returncode == 0:
            break
        print(done.stderr[-5000:], file=sys.stderr, flush=True)
        said = [
            line.removeprefix(REPORT_PREFIX)
            for line in done.stderr.splitlines()
            if line.startswith(REPORT_PREFIX)
        ]
        failures.append(
            {
                "setup": f"{strategy_name} x {workers}",
                "seed": seed,
                "launcher": said[-1] if said else f"exit status {done.returncode}",
            }
        )
    else:
        raise RuntimeError(f"{strategy_name} x {workers} failed {ATTEMPTS} times")
    found = []
    for index in range(workers if strategy_name == "ParameterServer" else 1):
        with open(os.path.join(out, f"worker_{index}.json")) as f:
            found.append(json.load(f))
    return found


def row(workers: int, rounds: list[dict], one_device: list[float]) -> dict:
    """The table's row for `workers` workers from every round's results."""
    ps = [r["ParameterServer", workers] for r in rounds]
    dp = [r["DataParallel", workers] for r in rounds]
    ratios = [
        p[0]["samples_per_second"] / d[0]["samples_per_second"]
        for p, d in zip(ps, dp, strict=True)
    ]
    return {
        "workers": workers,
        "ps_accuracies": [p[0]["accuracy"] for p in ps],
        "dp_accuracies": [d[0]["accuracy"] for d in dp],
        "ps_minus_one_device": [
            p[0]["accuracy"] - a for p, a in zip(ps, one_device, strict=True)
        ],
        "dp_minus_one_device": [
            d[0]["accuracy"] - a for d, a in zip(dp, one_device, strict=True)
        ],
        # A job's mean staleness: its workers take as many steps each.
        "mean_staleness": statistics.median(
            statistics.mean(w["mean_staleness"] for w in p) for p in ps
        ),
        "max_staleness": max(w["max_staleness"] for p in ps for w in p),
        "updates_per_worker": ps[0][0]["updates"],
        "ps_samples_per_second": statistics.median(
            p[0]["samples_per_second"] for p in ps
        ),
        "dp_samples_per_second": statistics.median(
            d[0]["samples_per_second"] for d in dp
        ),
        "ps_over_dp": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--task", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        strategy_name, seed, out = args.task
        run_task(strategy_name, int(seed), out)
        return

    rounds, one_device, failures = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            one_device.append(
                measure("one device", 1, seed, folder, failures)[0]["accuracy"]
            )
            # Rotate which setup goes first, against slow spells.
            setups = [(s, n) for n in WORKERS for s in STRATEGIES]
            setups = setups[seed % len(setups) :] + setups[: seed % len(setups)]
            rounds.append(
                {(s, n): measure(s, n, seed, folder, failures) for s, n in setups}
            )
            print(
                f"seed {seed}: one device {one_device[-1]:.3f}; "
                + "; ".join(
                    f"{s} x {n}: {r[0]['accuracy']:.3f}, "
                    f"{r[0]['samples_per_second']:,.0f} samples/s"
                    for (s, n), r in rounds[-1].items()
                ),
                flush=True,
            )
    tables.publish(
        "parameter_server",
        {
            "settings": {
                "ps_tasks": PS_TASKS,
                "epochs": EPOCHS,
                "batch": BATCH,
                "train_samples": TRAIN,
                "held_out_samples": HELD_OUT,
                "seeds": args.seeds,
                "one_device_accuracies": ", ".join(f"{a:.3f}" for a in one_device),
            },
            "failures": failures,
            "one_device_accuracies": one_device,
            "rows": [row(n, rounds, one_device) for n in WORKERS],
        },
    )


if __name__ == "__main__":
    main()
