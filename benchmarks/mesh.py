"""Step time, bytes per device and bytes communicated of MeshParallel.

A Megatron-style MLP (256 inputs, two blocks of a column-parallel
Dense(2048, relu) `up` and a row-parallel Dense(256) `down` with a residual,
a Dense(10) head; Adam, global batch 256) on one device, under DataParallel on
4 devices and under MeshParallel on (batch, model) meshes of shape (1, 4)
(tensor parallelism alone), (2, 2) (hybrid) and (4, 1) (data parallelism
through the mesh), all in one process on 4 logical CPU devices. The layout
map splits the `up` kernels on their output axis and the `down` kernels on
their input axis; the `up` biases follow their kernel.

The setups take turns, one epoch each and a different one first every round;
each round gives every setup's epoch time over the single device's in that
round, and the figure is the median of those ratios over `--repeats` rounds
(after a warm-up epoch), which cancels the machine's slow spells. Logical CPU
devices share two cores, so no setup can run faster than one device: what is
measured is overhead.

Bytes per device are those of the weights and optimizer state, read from
each variable's per-device copies (largest and smallest device). Bytes
communicated per step and per device are the gradient all-reduce's
(`communication_stats()["all_reduce_bytes_per_step"]`; the all-gather of the
updated rows that the default `sharding` adds is not in this table) and,
under MeshParallel, the model-axis exchanges of the training step
(`exchanges()`), reported apart.

Usage:
    python benchmarks/mesh.py               # full table (~4 min), writes JSON
    python benchmarks/mesh.py --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import tables

SAMPLES, FEATURES, CLASSES = 4096, 256, 10
BATCH, BLOCKS, HIDDEN = 256, 2, 2048
MESHES = ((1, 4), (2, 2), (4, 1))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MB = 1e6


def make_data():
    """Random inputs and labels (the step time does not depend on them)."""
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.rand(SAMPLES, FEATURES).astype("float32")
    return x, rng.randint(0, CLASSES, SAMPLES)


def build_megatron_mlp(strategy):
    """A freshly seeded Megatron-style MLP with Adam, built and compiled in
    `strategy`'s scope."""
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((FEATURES,))
        x = inputs
        for i in range(BLOCKS):
            up = keras.layers.Dense(HIDDEN, activation="relu", name=f"up{i}")(x)
            x = x + keras.layers.Dense(FEATURES, name=f"down{i}")(up)
        outputs = keras.layers.Dense(CLASSES, name="head")(x)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


def mesh_strategy(shape):
    import keras

    import keras_parallel

    mesh = keras.distribution.DeviceMesh(
        shape=shape,
        axis_names=("batch", "model"),
        devices=[f"cpu:{i}" for i in range(4)],
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["up.*/kernel"] = (None, "model")
    layout_map["down.*/kernel"] = ("model", None)
    return keras_parallel.MeshParallel(layout_map, batch_dim_name="batch")


def bytes_per_device(model, devices: int = 4) -> dict[str, int]:
    """Bytes of weights plus optimizer state on each of the logical CPUs
    (0 for a device holding none)."""
    totals = {f"CPU:{i}": 0 for i in range(devices)}
    for variable in model.weights + model.optimizer.variables:
        value = variable.value
        copies = value.values if hasattr(value, "values") else (value,)
        for copy in copies:
            device = copy.device.rsplit("device:", 1)[-1]
            totals[device] = totals.get(device, 0) + copy.numpy().nbytes
    return totals


def communication(strategy) -> tuple[int | None, int | None]:
    """(gradient all-reduce bytes, model-axis exchange bytes) per step and
    device; None where the strategy has no such traffic to report."""
    stats = getattr(strategy, "communication_stats", None)
    reduce_bytes = stats()["all_reduce_bytes_per_step"] if stats else None
    exchanges = getattr(strategy, "exchanges", None)
    exchange_bytes = sum(e["bytes"] for e in exchanges()) if exchanges else None
    return reduce_bytes, exchange_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    import keras_parallel
    from keras_parallel.demo import epoch_times

    keras_parallel.virtual_devices(4)
    import tensorflow as tf

    x, y = make_data()

    setups = {
        "single device": tf.distribute.get_strategy(),
        "DataParallel": keras_parallel.DataParallel(),
    }
    for shape in MESHES:
        setups[f"MeshParallel {shape[0]}x{shape[1]}"] = mesh_strategy(shape)

    models, traffic = {}, {}
    for name, strategy in setups.items():
        model = build_megatron_mlp(strategy)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # warm-up
        # Right after fit: the exchanges are those of the training step.
        traffic[name] = communication(strategy)
        models[name] = model

    start_all = time.perf_counter()
    times = epoch_times(models, (x, y), BATCH, args.repeats)
    timed_s = time.perf_counter() - start_all

    steps = SAMPLES // BATCH
    single_total = sum(bytes_per_device(models["single device"]).values())
    rows = []
    for key, model in models.items():
        per_device = bytes_per_device(model)
        reduce_bytes, exchange_bytes = traffic[key]
        strategy = setups[key]
        rows.append(
            {
                "setup": key,
                "mesh_shape": list(strategy.mesh_shape)
                if hasattr(strategy, "mesh_shape")
                else None,
                "step_ms": 1000 * statistics.median(times[key]) / steps,
                "over_single": statistics.median(
                    t / s
                    for t, s in zip(times[key], times["single device"], strict=True)
                ),
                "max_device_mb": max(per_device.values()) / MB,
                "min_device_mb": min(per_device.values()) / MB,
                "bytes_per_device": per_device,
                "single_device_total_mb": single_total / MB,
                "allreduce_mb_per_step": None
                if reduce_bytes is None
                else reduce_bytes / MB,
                "exchange_mb_per_step": None
                if exchange_bytes is None
                else exchange_bytes / MB,
            }
        )
    result = {
        "settings": {
            "repeats": args.repeats,
            "samples": SAMPLES,
            "features": FEATURES,
            "hidden": HIDDEN,
            "blocks": BLOCKS,
            "classes": CLASSES,
            "global_batch": BATCH,
            "steps_per_epoch": steps,
            "devices": 4,
            "physical_cores": os.cpu_count(),
            "layout": {
                "up.*/kernel": [None, "model"],
                "down.*/kernel": ["model", None],
            },
            "timed_seconds": timed_s,
            "mb": "1e6 bytes",
        },
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "mesh.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(tables.render("mesh"), end="")
    print(f"\nwrote {path} ({args.repeats} rounds, {timed_s:.0f} s timed)")


if __name__ == "__main__":
    main()
