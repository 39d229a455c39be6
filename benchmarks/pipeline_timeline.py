"""The order in which each device runs the micro-batches' forwards and
backwards under GPipe and 1F1B, and each device's idle fraction of the step
next to the bubble (p - 1) / (m + p - 1), read from TensorFlow's profiler.

A model of 8 x Dense(512, relu) on 512 inputs, mean squared error, SGD,
global batch 1024, 8 micro-batches, over 2 and 4 logical CPU devices (stages
balanced by bytes: 4 and 2 layers each). For each setting, after a warm-up
step, `--steps` steps are recorded one at a time, the settings taking turns
(`timeline.record`). The step of median span is reported: each device's
(micro-batch, phase) in the order they started, its busy fraction (the union
of its layers' ops over the span from the first layer op to the last) and
its idle fraction (the measured bubble); and each device's idle fraction in
every recorded step, and their median. Their Gantt chart goes to
docs/images/pipeline_timeline.png.

Logical CPU devices share the machine's cores (2 here) and TensorFlow's
thread pools: the stages do not run in parallel as on separate
accelerators. Two devices' ops may run at once, each slower, and a device
counts as busy while one of its ops runs, so the idle fraction mixes the
schedule's waits with waiting for a core. The orders a schedule enforces
hold on any devices; the idle fractions are this machine's.

Usage:
    python benchmarks/pipeline_timeline.py          # writes results/, docs/images/
    python benchmarks/pipeline_timeline.py --steps 3
    python benchmarks/pipeline_timeline.py --plot-only   # the picture from the JSON
"""

from __future__ import annotations

import json
import os
import statistics

import tables
import timeline
from mlp import build_square_mlp

BATCH, WIDTH, DEPTH, MICROBATCHES = 1024, 512, 8, 8
SETTINGS = [("gpipe", 2), ("1f1b", 2), ("gpipe", 4), ("1f1b", 4)]
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PICTURE = os.path.join(HERE, "..", "docs", "images", "pipeline_timeline.png")


def row(schedule: str, stages: int, recorded: list[timeline.Timeline]) -> dict:
    """A setting's result: the orders, busy and idle fractions and intervals
    of its step of median span, and each device's idle fraction in every
    recorded step."""
    spans = [step.span for step in recorded]
    step = recorded[spans.index(statistics.median_low(spans))]
    return {
        "schedule": schedule,
        "stages": stages,
        "bubble_formula": (stages - 1) / (MICROBATCHES + stages - 1),
        "span_ms": 1000 * step.span,
        "devices": {
            device: {
                "order": [list(pair) for pair in step.order(device)],
                "busy": step.busy[device] / step.span,
                "idle": step.idle(device),
                "idle_every_step": [other.idle(device) for other in recorded],
                "idle_median": statistics.median(
                    other.idle(device) for other in recorded
                ),
            }
            for device in step.devices
        },
        "intervals": [
            [i.device, i.microbatch, i.phase, 1000 * i.start, 1000 * i.end]
            for i in step.intervals
        ],
    }


def lanes(intervals: list) -> dict:
    """A lane for each interval, the lowest free one at its start: intervals
    of one device and phase that overlap (a device may run several
    micro-batches' ops at once) go to different lanes."""
    ends: list[float] = []
    found = {}
    for interval in sorted(intervals, key=lambda i: i[3]):
        start, end = interval[3], interval[4]
        lane = next((k for k, last in enumerate(ends) if last <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        else:
            ends[lane] = end
        found[tuple(interval[:3])] = lane
    return found


def gantt(rows: list[dict], path: str) -> None:
    """One panel per setting, one band per device: each micro-batch's
    forward (Fk) above its backwards (Bk), in as many lanes as the device
    ran micro-batches at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {timeline.FORWARD: "#4c78a8", timeline.BACKWARD: "#f58518"}
    layouts = []
    for found in rows:
        devices = sorted(found["devices"])
        lane_of, bands = {}, []
        for device in devices:
            band = {}
            for phase in (timeline.FORWARD, timeline.BACKWARD):
                mine = [
                    i for i in found["intervals"] if i[:1] == [device] and i[2] == phase
                ]
                lane_of.update(lanes(mine))
                band[phase] = 1 + max(lane_of[tuple(i[:3])] for i in mine)
            bands.append(band)
        layouts.append((devices, lane_of, bands))
    heights = [sum(sum(b.values()) for b in bands) + 2 for _, _, bands in layouts]
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(11, 0.2 * sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights},
    )
    for ax, found, (devices, lane_of, bands) in zip(axes, rows, layouts, strict=True):
        top, ticks = 0, []
        for device, band in zip(devices, bands, strict=True):
            first = {
                timeline.FORWARD: top,
                timeline.BACKWARD: top + band[timeline.FORWARD],
            }
            for interval in found["intervals"]:
                if interval[0] != device:
                    continue
                _, microbatch, phase, start, end = interval
                y = first[phase] + lane_of[tuple(interval[:3])]
                ax.broken_barh(
                    [(start, end - start)], (y + 0.05, 0.9), color=colors[phase]
                )
                if end - start >= found["span_ms"] / 60:  # room for a label
                    label = ("F" if phase == timeline.FORWARD else "B") + str(
                        microbatch
                    )
                    ax.text(
                        start + found["span_ms"] / 400,
                        y + 0.5,
                        label,
                        va="center",
                        fontsize=6.5,
                        color="white",
                    )
            height = sum(band.values())
            ticks.append(
                (
                    top + height / 2,
                    f"{device}\nidle {found['devices'][device]['idle']:.0%}",
                )
            )
            top += height
            ax.axhline(top + 0.0, color="#999999", linewidth=0.5)
        ax.set_yticks([t for t, _ in ticks])
        ax.set_yticklabels([label for _, label in ticks], fontsize=8)
        ax.set_ylim(top, 0)
        ax.set_xlim(0, found["span_ms"])
        ax.set_title(
            f"{found['schedule']}, {found['stages']} stages, {MICROBATCHES} "
            f"micro-batches: (p-1)/(m+p-1) = {found['bubble_formula']:.0%}",
            fontsize=9,
        )
    axes[-1].set_xlabel(
        "ms from the step's first layer op (one recorded step)\nFk / Bk: micro-batch "
        "k's forward / backward on the device, from its first op's start to its "
        "last op's end (short ones unlabelled)"
    )
    timeline.save(fig, path)


def main() -> None:
    args = timeline.arguments(__doc__.splitlines()[0], steps=7)
    path = os.path.join(RESULTS, "pipeline_timeline.json")
    if args.plot_only:
        with open(path) as f:
            gantt(json.load(f)["rows"], PICTURE)
        return

    import keras_parallel

    devices = keras_parallel.virtual_devices(4)
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    models = {
        (schedule, stages): build_square_mlp(
            keras_parallel.PipelineParallel(
                devices[:stages], MICROBATCHES, schedule=schedule
            ),
            DEPTH,
            WIDTH,
        )
        for schedule, stages in SETTINGS
    }
    steps = {key: [] for key in models}
    for _ in range(args.steps):
        for key, model in models.items():
            steps[key].append(timeline.record(model, x, y))
    rows = [row(schedule, stages, found) for (schedule, stages), found in steps.items()]
    result = {
        "settings": {
            "model": f"{DEPTH} x Dense({WIDTH}, relu)",
            "depth": DEPTH,
            "width": WIDTH,
            "batch": BATCH,
            "num_microbatches": MICROBATCHES,
            "recorded_steps": args.steps,
            "physical_cores": os.cpu_count(),
            "note": (
                "Logical CPU devices share the machine's cores and TensorFlow's "
                "thread pools, so stages do not run in parallel as on separate "
                "accelerators: two devices' ops may run at once, each slower, and "
                "p devices taking turns would each idle about 1 - 1/p of the step "
                "(50% at p = 2, 75% at p = 4). A device is busy while one of its "
                "layers' ops runs; idle is 1 - busy over the span from the step's "
                "first layer op to its last (loss and optimizer excluded), so it "
                "mixes the schedule's waits with waiting for a core. The orders a "
                "schedule enforces hold on any devices; the idle fractions are "
                "this machine's."
            ),
        },
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    gantt(rows, PICTURE)
    print(tables.render("pipeline_timeline"), end="")
    print(f"\nwrote {path} and {os.path.normpath(PICTURE)}")


if __name__ == "__main__":
    main()
