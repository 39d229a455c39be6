"""Step time of PipelineParallel's partition="auto" (bytes) against "time".

A model whose layers differ in cost per byte: two 3x3 convolutions over
16x16x32 inputs (9K weights each, 2.4M multiply-adds per sample each), then
Dense layers of width 1024 (1M weights and 1M multiply-adds each). "auto"
balances bytes, so the first stage gets both convolutions and half the Dense
bytes; "time" balances the measured forward and backward times. Both run on
2 logical CPU devices sharing 2 cores, with 1 and 4 micro-batches, beside one
device; all in one process. The setups take turns, one epoch each and a
different one first every round; a setup's figure is the median over
`--repeats` rounds of its epoch time over the single device's in that round
(after a warm-up epoch). Each stage's measured time is the sum of its units'
times from `layer_times.unit_times`, the profile `"time"` balances (batch
32), measured again once training is done with 30 runs a unit (placement
takes the median of 10, so near-equal splits can come out either way).

Usage:
    python benchmarks/pipeline_partition.py               # writes JSON
    python benchmarks/pipeline_partition.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import tables

BATCH, SAMPLES, CLASSES = 128, 1024, 10


def build(strategy):
    """The conv-then-Dense model, freshly seeded, in `strategy`'s scope."""
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((16, 16, 32))]
            + [keras.layers.Conv2D(32, 3, padding="same") for _ in range(2)]
            + [keras.layers.GlobalAveragePooling2D()]
            + [keras.layers.Dense(1024, activation="relu") for _ in range(5)]
            + [keras.layers.Dense(CLASSES)]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


def stages(model, devices: list[str]) -> tuple[list[int], list[float]]:
    """Layers and measured seconds of each stage: its units' `unit_times`,
    each unit on the device of its weights (one without, on the stage of the
    unit before it)."""
    import keras_parallel
    from keras_parallel.devices import short_device
    from keras_parallel.pipeline.layer_times import unit_times
    from keras_parallel.pipeline.units import stage_units
    from keras_parallel.placement import stage_layers

    report = keras_parallel.placement_report(model)
    device_of = {row.layer: row.device for row in report.layers}
    names = [short_device(d) for d in devices]
    units = stage_units(model, stage_layers(model))
    counts, seconds, stage = [0] * len(devices), [0.0] * len(devices), 0
    for unit, time in zip(
        units, unit_times(model, units, devices[0], repeats=30), strict=True
    ):
        placed = [device_of[layer.name] for layer in unit if device_of[layer.name]]
        if placed:
            stage = names.index(placed[0])
        counts[stage] += len(unit)
        seconds[stage] += time
    return counts, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import keras_parallel
    from keras_parallel.demo import epoch_times

    devices = keras_parallel.virtual_devices(2)
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    x = rng.rand(SAMPLES, 16, 16, 32).astype("float32")
    y = rng.randint(0, CLASSES, SAMPLES)
    setups = {("single device", 1): tf.distribute.get_strategy()}
    for partition in ("auto", "time"):
        for microbatches in (1, 4):
            setups[(partition, microbatches)] = keras_parallel.PipelineParallel(
                devices, num_microbatches=microbatches, partition=partition
            )
    models = {key: build(strategy) for key, strategy in setups.items()}
    for model in models.values():
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # traces, places
    times = epoch_times(models, (x, y), BATCH, args.repeats)
    single = times[("single device", 1)]
    rows = []
    for (partition, microbatches), model in models.items():
        epochs = times[(partition, microbatches)]
        row = {
            "partition": partition,
            "num_microbatches": microbatches,
            "step_ms": 1000 * statistics.median(epochs) / (SAMPLES // BATCH),
            "over_single": statistics.median(
                t / s for t, s in zip(epochs, single, strict=True)
            ),
        }
        if partition != "single device":
            counts, seconds = stages(model, devices)
            row["layers_per_stage"] = counts
            row["stage_ms"] = [1000 * t for t in seconds]
        rows.append(row)
    tables.publish(
        "pipeline_partition", {"settings": {"repeats": args.repeats}, "rows": rows}
    )


if __name__ == "__main__":
    main()
