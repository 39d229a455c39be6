"""Activation memory of PipelineParallel's schedules, with and without
recomputation, against one device.

An activation-dominated model: 8 x Dense(1024, relu) on 1024 inputs, SGD,
global batch 8192, 8 micro-batches over 2 logical CPU devices. For one
device and each schedule x recompute setting this reports:

- held at once: the forward tensors the traced step's backward reads
  (`keras_parallel.graph_memory`), per device, counting of each stage's
  micro-batches as many as it holds at once (M under GPipe, p - s under
  1F1B, enforced by the graph's control dependencies) and everything
  outside the micro-batches (the data, the joined output);
- peak growth: in a fresh process per setting, after a warm-up step (which
  traces), the peak of the bytes TensorFlow's host allocator holds over 2
  training steps minus what it holds before them
  (`tf.config.experimental.get_memory_info`; the logical CPU devices share
  one allocator, so this is the process's tensor memory). The resident size
  of the process does not show it: after the warm-up step the allocator's
  freed blocks stay resident, and every setting grew by the same 64-92 MB
  (measured);
- step time: the median of those processes' step times over one device's,
  the settings' processes taking turns for `--rounds` rounds.

Usage:
    python benchmarks/pipeline_memory.py    # writes results/pipeline_memory.json
    python benchmarks/pipeline_memory.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import tables

BATCH, WIDTH, DEPTH, MICROBATCHES = 8192, 1024, 8, 8
SETTINGS = [
    ("one device", None, None),
    ("gpipe", "gpipe", False),
    ("gpipe + recompute", "gpipe", True),
    ("1f1b", "1f1b", False),
    ("1f1b + recompute", "1f1b", True),
]

CHILD = """
import json, sys, time
sys.path.insert(0, {here!r})
import keras_parallel
keras_parallel.virtual_devices(2)
import numpy as np, tensorflow as tf
from keras_parallel.graph_memory import held_bytes, traced_train_step
from mlp import build_square_mlp

schedule, recompute = json.loads(sys.argv[1])
batch, width, depth, microbatches = {batch}, {width}, {depth}, {microbatches}

strategy = (
    tf.distribute.get_strategy() if schedule is None
    else keras_parallel.PipelineParallel(
        num_microbatches=microbatches, schedule=schedule, recompute=recompute
    )
)
model = build_square_mlp(strategy, depth, width)
x = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
held = held_bytes(traced_train_step(model, x, x), by_microbatch=True)
held = [[device, mb, size] for (device, mb), size in held.items()]
model.train_on_batch(x, x)  # traces
tf.config.experimental.reset_memory_stats("CPU:0")
before = tf.config.experimental.get_memory_info("CPU:0")["current"]
times = []
for _ in range(2):
    start = time.perf_counter()
    model.train_on_batch(x, x)
    times.append(time.perf_counter() - start)
peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
print(json.dumps({{"held": held, "peak_growth": peak - before,
                  "step_s": min(times)}}))
"""


def run(schedule, recompute) -> dict:
    """One setting measured in a fresh process."""
    code = CHILD.format(
        here=os.path.dirname(os.path.abspath(__file__)),
        batch=BATCH,
        width=WIDTH,
        depth=DEPTH,
        microbatches=MICROBATCHES,
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([schedule, recompute])],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_flight(schedule, device: str, stages: int = 2) -> int:
    """How many micro-batches a stage holds at once (the schedule's bound)."""
    from keras_parallel.pipeline.schedule import schedule_named

    bound = schedule_named(schedule).in_flight(int(device.split(":")[-1]), stages)
    return MICROBATCHES if bound is None else min(MICROBATCHES, bound)


def held_at_once(schedule, held: list) -> dict[str, int]:
    """Bytes held at once per device: of the largest micro-batches, as many
    as the stage holds at once, plus what belongs to none."""
    per_device: dict[str, list] = {}
    outside: dict[str, int] = {}
    for device, microbatch, size in held:
        if microbatch is None:
            outside[device] = outside.get(device, 0) + size
        else:
            per_device.setdefault(device, []).append(size)
    result = {}
    for device in sorted(set(per_device) | set(outside)):
        sizes = sorted(per_device.get(device, []), reverse=True)
        count = in_flight(schedule, device) if schedule else 1
        result[device or "one device"] = sum(sizes[:count]) + outside.get(device, 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    measured: dict[str, list[dict]] = {name: [] for name, _, _ in SETTINGS}
    for round_ in range(args.rounds):
        order = SETTINGS[round_ % len(SETTINGS) :] + SETTINGS[: round_ % len(SETTINGS)]
        for name, schedule, recompute in order:
            measured[name].append(run(schedule, recompute))
    one = measured["one device"]
    rows = []
    for name, schedule, _ in SETTINGS:
        runs = measured[name]
        held = held_at_once(schedule, runs[0]["held"])
        rows.append(
            {
                "setting": name,
                "held_mb": {d: size / 2**20 for d, size in held.items()},
                "largest_held_mb": max(held.values()) / 2**20,
                "peak_growth_mb": statistics.median(r["peak_growth"] for r in runs)
                / 2**20,
                "step_over_one_device": statistics.median(
                    r["step_s"] / o["step_s"] for r, o in zip(runs, one, strict=True)
                ),
            }
        )
    gpipe = next(r for r in rows if r["setting"] == "gpipe")["peak_growth_mb"]
    for row in rows:
        row["peak_over_gpipe"] = row["peak_growth_mb"] / gpipe
    settings = {
        "batch": BATCH,
        "width": WIDTH,
        "depth": DEPTH,
        "num_microbatches": MICROBATCHES,
        "rounds": args.rounds,
    }
    tables.publish("pipeline_memory", {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
