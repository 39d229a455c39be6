"""When each device ran each micro-batch's forward and backward, read from
TensorFlow's profiler.

One training step of a PipelineParallel model is recorded with
`tf.profiler.experimental` (after a warm-up call, so that tracing is not in
it). The profiler writes an XSpace (`*.xplane.pb`) whose host events include
one per executed op, named `<op name>:<op type>`. Each event is matched by op
name to the traced graph of the step, which gives the op's device and, from
its name, its micro-batch and phase: PipelineParallel names each
micro-batch's ops `microbatch_<i>/`, backward ops carry `gradient_tape/` and
recomputation `recompute/` (counted with the backward). Only the ops of the
model's call count (its layers, under the model's name scope, and their
replays, under `recompute/`), each on its stage's device; the loss, the
metrics and the optimizer, the cutting and joining of the batch, copies
between devices (`_Send`/`_Recv`, added when the graph is partitioned) and
ops that do nothing (`NoOp`) do not. Under GPipe a replay's ops carry no
micro-batch in their names, so a step that recomputes is read under 1F1B
only.

An interval is the first start and the last end of a (device, micro-batch,
phase)'s ops; a device's busy time is the union of its counted ops' events.

This module is shared by `pipeline_timeline.py`,
`tests/pipeline/test_timeline.py` and `overlap.py` (which reads the events of
`profile` against its own classes of ops); it imports TensorFlow's XSpace protocol
buffer (`tensorflow.tsl`), which the package itself does not depend on.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import tempfile

FORWARD, BACKWARD = "forward", "backward"
_MICROBATCH = re.compile(r"(?:^|/)microbatch_(\d+)/")
# Backward ops (and replays, counted with the backward), by their name scope.
BACKWARD_SCOPE = re.compile(
    r"(?:^|/)(gradient_tape|gradients(_\d+)?|recompute(_\d+)?)/"
)
_REPLAY = re.compile(r"(?:^|/)recompute(_\d+)?/")
_DEVICE = re.compile(r"device:([A-Z]+:\d+)$")


@dataclasses.dataclass(frozen=True)
class OpKind:
    """What an op of the step is: its device (short form, `"CPU:1"`), its
    micro-batch and its phase (`FORWARD` or `BACKWARD`)."""

    device: str
    microbatch: int
    phase: str


@dataclasses.dataclass(frozen=True)
class Interval:
    """A (device, micro-batch, phase)'s ops, from the first start to the
    last end, in seconds from the start of the step's first counted op."""

    device: str
    microbatch: int
    phase: str
    start: float
    end: float


@dataclasses.dataclass
class Timeline:
    """The intervals of one recorded step and each device's busy time.

    Attributes:
        intervals: One per (device, micro-batch, phase) that ran ops.
        busy: Per device, the seconds in which at least one of its counted
            ops ran.
        span: Seconds from the first counted op's start to the last's end.
    """

    intervals: list[Interval]
    busy: dict[str, float]
    span: float

    def interval(self, device: str, microbatch: int, phase: str) -> Interval:
        """The interval of one device, micro-batch and phase."""
        for found in self.intervals:
            if (found.device, found.microbatch, found.phase) == (
                device,
                microbatch,
                phase,
            ):
                return found
        raise KeyError((device, microbatch, phase))

    @property
    def devices(self) -> list[str]:
        """The devices that ran counted ops, in order."""
        return sorted({i.device for i in self.intervals})

    def order(self, device: str) -> list[tuple[int, str]]:
        """The device's (micro-batch, phase) pairs in the order they started."""
        mine = sorted(
            (i for i in self.intervals if i.device == device), key=lambda i: i.start
        )
        return [(i.microbatch, i.phase) for i in mine]

    def idle(self, device: str) -> float:
        """The fraction of the step's span in which the device ran none of
        its counted ops (the measured bubble)."""
        return 1 - self.busy[device] / self.span


def op_kinds(graph, model) -> dict[str, OpKind]:
    """The counted ops of a traced step (and of the functions it calls), by
    name: the ops of `model`'s call and of its stages' replays inside a
    micro-batch that carry a device.

    Args:
        graph: The step's `tf.Graph`.
        model: The Keras model whose call's ops count (its name scope is
            `model.name`, or that name with a `_<n>` suffix).

    Raises:
        ValueError: a replay's ops name no micro-batch (GPipe with
            recomputation).
    """
    from keras_parallel._tf_internal import graph_functions

    model_scope = re.compile(rf"(?:^|/){re.escape(model.name)}(?:_\d+)?/")
    kinds: dict[str, OpKind] = {}

    def visit(g):
        for op in g.get_operations():
            microbatch = _MICROBATCH.search(op.name)
            device = _DEVICE.search(op.device)
            if microbatch is None and device and _REPLAY.search(op.name):
                raise ValueError(
                    f"The replay op {op.name} names no micro-batch (a step "
                    "that recomputes under GPipe): its micro-batch is unknown."
                )
            if (
                microbatch is None
                or device is None
                or op.type == "NoOp"
                or not (model_scope.search(op.name) or _REPLAY.search(op.name))
            ):
                continue
            phase = BACKWARD if BACKWARD_SCOPE.search(op.name) else FORWARD
            kinds[op.name] = OpKind(device.group(1), int(microbatch.group(1)), phase)
        for inner in graph_functions(g):
            visit(inner)

    visit(graph)
    return kinds


def read_events(path: str) -> list[tuple[str, int, int]]:
    """The op events of an XSpace file: (op name, start, end) in picoseconds.

    Host events of executed ops are named `<op name>:<op type>` (op names
    hold no colon); other events (the executor's, Python's) are left out.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        names = {}
        for key, metadata in plane.event_metadata.items():
            name, colon, kind = metadata.name.rpartition(":")
            if colon and name and kind and " " not in metadata.name:
                names[key] = name
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            for event in line.events:
                name = names.get(event.metadata_id)
                if name is not None:
                    start = base + event.offset_ps
                    events.append((name, start, start + event.duration_ps))
    return events


def build(events, kinds: dict[str, OpKind]) -> Timeline:
    """The timeline of the events whose op is counted in `kinds`.

    Raises:
        ValueError: no event matches a counted op.
    """
    matched = [
        (kinds[name], start, end) for name, start, end in events if name in kinds
    ]
    if not matched:
        raise ValueError(
            "No profiler event names an op of the model's micro-batches: was "
            "the step recorded, and run with num_microbatches > 1?"
        )
    origin = min(start for _, start, _ in matched)
    last = max(end for _, _, end in matched)
    bounds: dict[tuple, list[int]] = {}
    per_device: dict[str, list[tuple[int, int]]] = {}
    for kind, start, end in matched:
        key = (kind.device, kind.microbatch, kind.phase)
        low, high = bounds.get(key, (start, end))
        bounds[key] = [min(low, start), max(high, end)]
        per_device.setdefault(kind.device, []).append((start, end))
    intervals = [
        Interval(
            device, microbatch, phase, (low - origin) / 1e12, (high - origin) / 1e12
        )
        for (device, microbatch, phase), (low, high) in sorted(bounds.items())
    ]
    busy = {device: _union(spans) / 1e12 for device, spans in per_device.items()}
    return Timeline(intervals, busy, (last - origin) / 1e12)


def _union(spans: list[tuple[int, int]]) -> int:
    """The length of the union of [start, end) spans."""
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def profile(function, *args, logdir: str | None = None) -> list[tuple[str, int, int]]:
    """The op events (`read_events`) of one call of `function(*args)` under
    TensorFlow's profiler, its trace written to `logdir` (a temporary
    folder, removed after reading, when None)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as temporary:
        folder = logdir or temporary
        tf.profiler.experimental.start(folder)
        try:
            function(*args)
        finally:
            tf.profiler.experimental.stop()
        paths = glob.glob(
            os.path.join(folder, "plugins", "profile", "*", "*.xplane.pb")
        )
        return read_events(max(paths, key=os.path.getmtime))


def record(model, x, y, logdir: str | None = None, warmup: int = 1) -> Timeline:
    """The timeline of one training step on `(x, y)`: `warmup` steps, then
    one step under TensorFlow's profiler (`profile`).

    The steps train the model (its weights and optimizer move).
    """
    import tensorflow as tf

    from keras_parallel.graph_memory import train_step_function

    # The graph it runs is the one whose ops the profiler names.
    function = train_step_function(model, x, y)
    x, y = tf.constant(x), tf.constant(y)
    for _ in range(warmup):
        function(x, y)
    kinds = op_kinds(function.graph, model)
    return build(profile(function, x, y, logdir=logdir), kinds)


def arguments(description: str, steps: int) -> argparse.Namespace:
    """The command line of a timeline benchmark: `--steps` to record (default
    `steps`) and `--plot-only` (redraw the picture from the JSON)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the picture from the JSON"
    )
    return parser.parse_args()


def save(figure, path: str) -> None:
    """Writes a timeline benchmark's matplotlib `figure` to `path`."""
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=110)
