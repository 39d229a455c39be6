"""When each gradient bucket's reduction runs, relative to the end of the
backward, read from TensorFlow's profiler.

DataParallel fuses gradients into buckets (`bucket_mb`) filled in the order
the backward produces them (`keras_parallel/reduction/buckets.py`), so a
bucket of the last layers' gradients can be reduced while the backward still
computes the first layers'. Here the 2x1024 ReLU MLP of the step-time
benchmark (64 inputs, 10 classes, Adam, global batch 256) trains under
`DataParallel` on 2 logical CPU devices with the in-process default
`bucket_mb` (0.25), which makes 4 buckets. After warm-up steps, `--steps`
training steps are recorded one at a time (`timeline.profile`); the
profiler's op events are matched by name to the traced step's ops:

- backward: ops under `gradient_tape/` (either replica); the backward ends
  when the last of them ends;
- bucket b: ops under `bucket_<b>/` (packing on each device, the sum on each
  device, unpacking); its reduction starts when the first of them starts and
  ends when the last ends;
- forward: the other ops of the model's layers (shown in the picture only).

Ops without inputs (constants) and the copies TensorFlow adds between devices
(`_Send`/`_Recv`, not in the traced graph) are left out. Per bucket the
median over the steps of its start and end, in ms relative to the end of the
backward (negative: before it), goes to results/overlap.json; one step (of
median backward end to last bucket end) is drawn to
docs/images/overlap_timeline.png.

Usage:
    python benchmarks/overlap.py               # writes results/, docs/images/
    python benchmarks/overlap.py --steps 5
    python benchmarks/overlap.py --plot-only   # the picture from the JSON
"""

from __future__ import annotations

import json
import os
import re
import statistics

import tables
import timeline
from mlp import build_mlp, make_data

DEPTH, WIDTH, BATCH, WARMUP = 2, 1024, 256, 3
HERE = os.path.dirname(os.path.abspath(__file__))
PICTURE = os.path.join(HERE, "..", "docs", "images", "overlap_timeline.png")
FORWARD, BACKWARD = timeline.FORWARD, timeline.BACKWARD
_BUCKET = re.compile(r"(?:^|/)bucket_(\d+)/")


def op_roles(graph, model) -> dict[str, tuple[str, str]]:
    """`{op name: (role, device)}` for the ops shown: role `"forward"`,
    `"backward"` or `"bucket <b>"`, device short (`"CPU:1"`)."""
    from keras_parallel._tf_internal import graph_functions
    from keras_parallel.devices import short_device

    model_scope = re.compile(rf"(?:^|/){re.escape(model.name)}(?:_\d+)?/")
    roles = {}
    pending = [graph]
    while pending:
        g = pending.pop()
        pending.extend(graph_functions(g))
        for op in g.get_operations():
            if not op.inputs or not op.device:
                continue
            bucket = _BUCKET.search(op.name)
            if bucket:
                role = f"bucket {bucket.group(1)}"
            elif timeline.BACKWARD_SCOPE.search(op.name):
                role = BACKWARD
            elif model_scope.search(op.name):
                role = FORWARD
            else:
                continue
            roles[op.name] = (role, short_device(op.device))
    return roles


def bucket_shapes(graph, device: str) -> dict[str, list[list[int]]]:
    """Per bucket, the shapes of the gradients it packs on `device` (the
    inputs of its reshapes that come from outside the bucket), in order."""
    shapes: dict[str, list[list[int]]] = {}
    for op in graph.get_operations():
        bucket = _BUCKET.search(op.name)
        if bucket and op.type == "Reshape" and op.device.endswith(device):
            source = op.inputs[0]
            if not _BUCKET.search(source.op.name):
                shapes.setdefault(f"bucket {bucket.group(1)}", []).append(
                    source.shape.as_list()
                )
    return shapes


def step(events, roles) -> dict:
    """One recorded step: each op event of a shown op as `[role, device,
    start, end]` in ms relative to the end of the backward, each bucket's
    `[start, end]`, and the backward's duration (first op to last)."""
    matched = [(roles[name], s, e) for name, s, e in events if name in roles]
    end = max(e for (role, _), _, e in matched if role == BACKWARD)
    ops = [
        [role, device, (s - end) / 1e9, (e - end) / 1e9]
        for (role, device), s, e in sorted(matched, key=lambda m: m[1])
    ]
    backward_start = min(start for role, _, start, _ in ops if role == BACKWARD)
    buckets: dict[str, list[float]] = {}
    for role, _, start, stop in ops:
        if role.startswith("bucket"):
            low, high = buckets.get(role, (start, stop))
            buckets[role] = [min(low, start), max(high, stop)]
    return {"ops": ops, "buckets": buckets, "backward_ms": -backward_start}


def summary(steps: list[dict], stats: dict, shapes: dict) -> list[dict]:
    """One row per bucket: its contents and the medians over the steps of
    its start and end relative to the end of the backward."""
    rows = []
    sent = {b["label"]: b for b in stats["buckets"] if b["kind"] == "all_reduce"}
    for label in sorted(steps[0]["buckets"], key=lambda b: int(b.split()[1])):
        starts = [s["buckets"][label][0] for s in steps]
        ends = [s["buckets"][label][1] for s in steps]
        rows.append(
            {
                "bucket": label,
                "shapes": shapes[label],
                "tensors": sent[label]["tensors"],
                "bytes": sent[label]["bytes"],
                "start_ms": statistics.median(starts),
                "end_ms": statistics.median(ends),
                "start_ms_every_step": starts,
                "end_ms_every_step": ends,
                "steps_started_before_backward_end": sum(s < 0 for s in starts),
            }
        )
    return rows


def gantt(result: dict, path: str) -> None:
    """One row per device's forward and backward and one per bucket: each op
    a bar (a bucket's extent a thin band behind its ops), time relative to
    the end of the backward (the dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops, spans = result["timeline"]["ops"], result["timeline"]["buckets"]
    devices = sorted({device for role, device, *_ in ops if role == BACKWARD})
    lanes = [(FORWARD, d) for d in devices] + [(BACKWARD, d) for d in devices]
    lanes += [(row["bucket"], None) for row in result["rows"]]
    colors = {FORWARD: "#4c78a8", BACKWARD: "#f58518"}
    low = min(start for *_, start, _ in ops)
    high = max(end for *_, end in ops)
    least = (high - low) / 600  # narrower ops are drawn this wide, to be seen
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(lanes) + 1.2))
    for y, (role, device) in enumerate(lanes):
        bars = [
            (start, max(end - start, least))
            for r, d, start, end in ops
            if r == role and (device is None or d == device)
        ]
        if role in spans:  # the reduction's extent, behind its ops
            start, end = spans[role]
            ax.broken_barh([(start, end - start)], (y + 0.4, 0.2), color="#c7e9c0")
        ax.broken_barh(bars, (y + 0.1, 0.8), color=colors.get(role, "#54a24b"))
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    labels = [f"{role} {device}" for role, device in lanes[: 2 * len(devices)]]
    labels += [
        f"{row['bucket']} ({row['bytes'] / 1e3:,.0f} kB)" for row in result["rows"]
    ]
    ax.set_yticks([y + 0.5 for y in range(len(lanes))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(lanes), 0)
    ax.set_xlim(low, high)
    settings = result["settings"]
    ax.set_title(
        f"{settings['model']}, DataParallel on {settings['devices']} logical CPU "
        f"devices, bucket_mb={settings['bucket_mb']}: one recorded step",
        fontsize=9,
    )
    ax.set_xlabel(
        "ms relative to the end of the backward (dashed: its last op, either "
        "replica); each bar one op"
    )
    timeline.save(fig, path)


def main() -> None:
    args = timeline.arguments(__doc__.splitlines()[0], steps=15)
    path = tables.RESULTS / tables.TABLES["overlap"].source
    if args.plot_only:
        gantt(json.loads(path.read_text()), PICTURE)
        return

    import keras_parallel

    devices = keras_parallel.virtual_devices(2)
    import tensorflow as tf

    from keras_parallel.graph_memory import train_step_function

    strategy = keras_parallel.DataParallel(devices)
    model = build_mlp(strategy, DEPTH, WIDTH)
    x, y = make_data()
    x, y = tf.constant(x[:BATCH]), tf.constant(y[:BATCH])
    function = train_step_function(model, x, y)
    for _ in range(WARMUP):
        function(x, y)
    roles = op_roles(function.graph, model)
    recorded = [
        step(timeline.profile(function, x, y), roles) for _ in range(args.steps)
    ]
    tails = [max(end for _, end in s["buckets"].values()) for s in recorded]
    shown = recorded[tails.index(statistics.median_low(tails))]
    stats = strategy.communication_stats()
    reduction = strategy.extended.gradient_reduction
    data = {
        "settings": {
            "model": f"{DEPTH}x{WIDTH} MLP",
            "batch": BATCH,
            "devices": len(devices),
            "bucket_mb": reduction.algorithm.default_bucket_mb,
            "recorded_steps": args.steps,
            "physical_cores": os.cpu_count(),
            "tail_ms_median": statistics.median(tails),
            "backward_ms_median": statistics.median(s["backward_ms"] for s in recorded),
            "note": (
                "The two logical devices share the machine's cores and TensorFlow's "
                "thread pools, and a reduction between them is copies and adds run "
                "by those same cores: no network or copy engine works beside the "
                "backward. So this shows when TensorFlow's executor starts each "
                "bucket (which ones it reduces before the backward ends), not the "
                "time overlapping saves on GPUs or between hosts; here a reduction "
                "run early takes a core from the backward."
            ),
        },
        "rows": summary(recorded, stats, bucket_shapes(function.graph, "CPU:0")),
        "timeline": shown,
    }
    tables.publish("overlap", data)
    gantt(data, PICTURE)
    print(f"wrote {os.path.normpath(PICTURE)}")


if __name__ == "__main__":
    main()
