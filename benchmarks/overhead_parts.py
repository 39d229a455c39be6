"""What each part of DataParallel's step costs on a small-op model: its step
time with that part taken out, over one device's.

A diagnostic, not a way to train: with a part taken out the numbers are
wrong. The 40x64 MLP of `overhead.py` (Adam, global batch 256) on 2 logical
CPUs, DataParallel with its default `sharding="auto"` (each weight's update
on one owner device, which then sends the new weight to the others), in one
process where these setups take turns, one `fit(epochs=1)` each, a
different one first every round:

- one device;
- two half batches: one device summing its batch halves' gradients
  (`overhead.HalvesMLP`: the forward and backward ops of two replicas);
- DataParallel;
- without the copies: the owner updates its copy and the other devices keep
  theirs (the non-owners' `assign` of the new weight is left out);
- without the reduction: each device's update reads its own replica's
  gradient (the bucketed sum is left out);
- without both.

The parts are taken out by replacing two methods of keras_parallel's own
classes in this process (`OptimizerSharded._update_on_owner`,
`Communicator.bucketed_sum`) before the setup's step is traced. Each ratio
is the median over the rounds of the round's epoch time over one device's.

Usage:
    python benchmarks/overhead_parts.py            # results/overhead_parts.json
    python benchmarks/overhead_parts.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import tables
from mlp import SAMPLES, build_mlp, make_data
from overhead import BATCH, EpochClock, HalvesMLP, step_ops

SHAPE = "40x64"
SETUPS = {
    "one device": (),
    "two half batches": (),
    "DataParallel": (),
    "without the copies": ("copies",),
    "without the reduction": ("reduction",),
    "without both": ("copies", "reduction"),
}


@contextlib.contextmanager
def without(parts):
    """Traces DataParallel steps with `parts` ("copies", "reduction") left
    out while in the block."""
    from keras_parallel.data_parallel.modes import optimizer_sharded
    from keras_parallel.reduction import communicator

    sharded = optimizer_sharded.OptimizerSharded
    update_on_owner = sharded._update_on_owner
    bucketed_sum = communicator.Communicator.bucketed_sum

    def owner_only(self, var, fn, args, kwargs):
        owner = self.owners.owner(var)
        with (
            optimizer_sharded.tf.device(var.values[owner].device),
            optimizer_sharded.UpdateContext(owner),
        ):
            result = fn(
                var.values[owner],
                *optimizer_sharded.select_replica(owner, args),
                **optimizer_sharded.select_replica(owner, kwargs),
            )
        return [result] * len(var.values)

    def unreduced(self, gradients, wire_dtype=None, label="bucket"):
        return [list(parts) for parts in gradients]

    if "copies" in parts:
        sharded._update_on_owner = owner_only
    if "reduction" in parts:
        communicator.Communicator.bucketed_sum = unreduced
    try:
        yield
    finally:
        sharded._update_on_owner = update_on_owner
        communicator.Communicator.bucketed_sum = bucketed_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import keras_parallel

    devices = keras_parallel.virtual_devices(2)
    import tensorflow as tf

    depth, width = (int(v) for v in SHAPE.split("x"))
    x, y = make_data()
    models, ops = {}, {}
    for name, parts in SETUPS.items():
        single = name in ("one device", "two half batches")
        strategy = (
            tf.distribute.get_strategy()
            if single
            else keras_parallel.DataParallel(devices)
        )
        with without(parts):
            model = build_mlp(strategy, depth, width)
            if name == "two half batches":
                model = HalvesMLP.like(model)
            # The first fit traces the step this setup keeps.
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            ops[name] = step_ops(model, x[:BATCH], y[:BATCH])
        models[name] = model
    names = list(SETUPS)
    seconds = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            clock = EpochClock(time.perf_counter)
            models[name].fit(
                x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clock]
            )
            seconds[name].append(clock.seconds)
    steps = SAMPLES // BATCH
    rows = [
        {
            "setup": name,
            "step_ms": 1000 * statistics.median(seconds[name]) / steps,
            "over_single": statistics.median(
                t / s for t, s in zip(seconds[name], seconds["one device"], strict=True)
            ),
            "ops": ops[name],
        }
        for name in names
    ]
    tables.publish(
        "overhead_parts",
        {
            "settings": {
                "model": SHAPE,
                "rounds": args.rounds,
                "global_batch": BATCH,
                "physical_cores": os.cpu_count(),
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
