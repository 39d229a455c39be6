"""The benchmark tables of the README and the docs, rendered from `results/`.

A page shows a table between the markers `<!-- table: NAME -->` and
`<!-- /table -->`; what stands between them is rendered here from the JSON
file the benchmark wrote, with a line saying how each ratio was computed, so
no figure is copied by hand. `tests/test_docs_numbers.py` checks every cell
shown against its result file.

Usage:
    python benchmarks/tables.py              # refresh the blocks in README.md and docs/
    python benchmarks/tables.py --check      # exit 1 when a block differs
    python benchmarks/tables.py mesh         # print one table

`mkdocs.yml` names this file as a hook: `on_page_markdown` renders every
page's blocks again when the site is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
BLOCK = re.compile(
    r"(<!-- table: (?P<name>[a-z_0-9]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S
)


@dataclasses.dataclass(frozen=True)
class Table:
    """One table: where its rows come from, its columns, how it was measured.

    `columns` maps each header to a function of `(row, rows, settings)` giving
    the cell's text; `note` is formatted with the JSON's `settings`.
    """

    source: str
    columns: dict[str, Callable]
    note: str
    rows: Callable = lambda data: data["rows"] if isinstance(data, dict) else data
    settings: Callable = lambda data: (
        data.get("settings", {}) if isinstance(data, dict) else {}
    )


def _num(spec: str, key: str, missing: str = "fails") -> Callable:
    def cell(row, rows, settings):
        value = row.get(key)
        return missing if value is None else format(value, spec)

    return cell


def _ranged(key: str) -> Callable:
    """`key` with its range over several runs (`<key>_range`)."""

    def cell(row, rows, settings):
        low, high = row[f"{key}_range"]
        return f"{row[key]:.2f} ({low:.2f}–{high:.2f})"

    return cell


def _text(key: str, missing: str = "–") -> Callable:
    def cell(row, rows, settings):
        value = row.get(key)
        # A table cell is one line without pipes.
        return missing if value is None else str(value).strip().replace("|", "\\|")

    return cell


def _mb(key: str) -> Callable:
    def cell(row, rows, settings):
        value = row.get(key)
        if value is None:
            return "–"
        return "0" if value == 0 else f"{value:.2f} MB"

    return cell


def _setup(row, rows, settings) -> str:
    # "sharding='optimizer', 2 devices" -> "`"optimizer"`, 2 devices"
    match = re.fullmatch(r"sharding=(.*), (\d+) devices", row["setup"])
    if not match:
        return row["setup"]
    mode = match.group(1).replace("'", '"')
    return f"`{mode}`, {match.group(2)} devices"


def _per_seed(spec: str, relative: bool) -> Callable:
    def cell(row, rows, settings):
        base = rows[0]["accuracies"]
        if relative and row is rows[0]:
            return "–"
        values = [
            a - b if relative else a
            for a, b in zip(row["accuracies"], base, strict=True)
        ]
        return ", ".join(format(v, spec) for v in values)

    return cell


def _list(key: str, spec: str) -> Callable:
    def cell(row, rows, settings):
        # + 0.0: a difference that rounds to zero shows as +0.000, not -0.000.
        return ", ".join(format(round(value, 3) + 0.0, spec) for value in row[key])

    return cell


def _order(row: dict, index: int) -> str:
    """A device's micro-batch forwards (F) and backwards (B) in time order."""
    device = sorted(row["devices"])[index]
    return " ".join(
        ("F" if phase == "forward" else "B") + str(microbatch)
        for microbatch, phase in row["devices"][device]["order"]
    )


def _compatibility_rows(data: dict) -> list[dict]:
    return [{"feature": feature, **cells} for feature, cells in data.items()]


TABLES = {
    "step_time": Table(
        source="step_time.json",
        columns={
            "model": _text("model"),
            "devices": _text("devices"),
            "steps_per_execution": _text("steps_per_execution"),
            "single ms": _num(".1f", "single_ms"),
            "MirroredStrategy ms": _num(".1f", "MirroredStrategy_ms"),
            "DataParallel ms": _num(".1f", "DataParallel_ms"),
            "DP / single": _num(".2f", "dp_over_single"),
            "DP / Mirrored": _num(".2f", "dp_over_mirrored"),
        },
        note=(
            "How computed: each row runs in its own process; the three setups take "
            "turns, one epoch each; a step time is the median epoch time over the "
            "steps of an epoch, and a ratio divides those two medians. `fails`: "
            "MirroredStrategy cannot run `steps_per_execution=16` "
            "(keras-team/keras#19246)."
        ),
    ),
    "overhead": Table(
        source="overhead.json",
        columns={
            "model": _text("model"),
            "devices": _text("devices"),
            "one device ms": _num(".1f", "single_ms"),
            "DataParallel / one device (range over runs)": _ranged(
                "DataParallel_over_single_epoch"
            ),
            "two half batches on one device / one device": _ranged(
                "single_halves_over_single_epoch"
            ),
            "steps only": _num(".2f", "DataParallel_over_single_steps"),
            "per `fit` call": _num(".2f", "DataParallel_over_single_fit"),
            "CPU time": _num(".2f", "DataParallel_over_single_cpu"),
            '`sharding="optimizer"` / one device': _num(
                ".2f", "DataParallel_optimizer_over_single_epoch"
            ),
            "MirroredStrategy / one device": _num(
                ".2f", "MirroredStrategy_over_single_epoch"
            ),
            'ops per step: one device, two halves, DataParallel, `"optimizer"`': (
                lambda row, rows, settings: ", ".join(
                    f"{row[f'{name}_ops']:,}"
                    for name in (
                        "single",
                        "single_halves",
                        "DataParallel",
                        "DataParallel_optimizer",
                    )
                )
            ),
        },
        note=(
            "How computed: each row runs in its own process, where the setups take "
            "turns, one `fit(epochs=1)` each, for {rounds} rounds; in a run, a ratio "
            "is the median over the rounds of each round's ratio to one device, of the "
            "epoch's wall time inside `fit` (its iterator and {steps_per_epoch} "
            "steps), of its steps alone (`steps only`: the calls of the compiled "
            "train function), of the whole `fit` call (`per fit call`: also Keras' "
            "work once per call, which under any strategy reads and reduces a first "
            "batch), or of the epoch's CPU time (`CPU time`: all threads of the "
            'process). DataParallel is its default, `sharding="auto"`. Two half '
            "batches: one device whose step sums the gradients of its batch's two "
            "halves (two replicas' forward and backward ops, no communication). The "
            "measurement ran {runs} times, each row's process once per run: shown is "
            "the median of the runs' ratios, in parentheses their range. Ops per "
            "step: the traced `train_step`, without constants and no-ops."
        ),
    ),
    "overhead_parts": Table(
        source="overhead_parts.json",
        columns={
            "setup": _text("setup"),
            "step ms": _num(".2f", "step_ms"),
            "/ one device": _num(".2f", "over_single"),
            "ops per step": _num(",", "ops"),
        },
        note=(
            "How computed: the {model} MLP, Adam, batch {global_batch}, 2 logical "
            "CPU devices, DataParallel's default; the setups take turns in one "
            "process, one `fit(epochs=1)` each, for {rounds} rounds; a ratio is the "
            "median over the rounds of the round's epoch time over one device's. "
            "With a part left out the numbers are wrong: a diagnostic of where the "
            "time goes (`benchmarks/overhead_parts.py`)."
        ),
    ),
    "first_fit": Table(
        source="first_fit.json",
        columns={
            "setting": _text("setting"),
            "first step s": _num(".1f", "first_step_s"),
            "its CPU time / Mirrored": _num(".2f", "first_step_cpu_over_mirrored"),
            "rest of epoch s": _num(".1f", "rest_of_epoch_s"),
            "first fit s": _num(".1f", "first_fit_s"),
            "first fit / Mirrored": _num(".2f", "first_fit_over_mirrored"),
            "second fit s": _num(".1f", "second_fit_s"),
            "second fit / Mirrored": _num(".2f", "second_fit_over_mirrored"),
            "nodes in the traced step": _num(",", "step_nodes"),
        },
        note=(
            "How computed: MobileNetV2 (alpha 0.35, 32x32x3, 10 classes), Adam, "
            "{samples} samples, batch {batch}, one epoch per `fit`, 2 logical CPU "
            "devices, DataParallel with its default options; one fresh process per "
            "setting and round, the settings taking turns for {rounds} rounds. "
            "First step: from the `fit` call to the end "
            "of batch 0 (tracing, graph optimization, one step); its CPU time: all "
            "the process's threads. Times are medians "
            "over the rounds; a ratio is the median over the rounds of that round's "
            "time over MirroredStrategy's, so it is not the ratio of the medians "
            "shown. Nodes: the graph of `strategy.run(model.train_step)` traced "
            "again after the timed fits, function bodies and constants included."
        ),
    ),
    "bucket_mb": Table(
        source="step_time_bucket_mb_25.json",
        columns={
            "model": _text("model"),
            "devices": _text("devices"),
            "single ms": _num(".1f", "single_ms"),
            "MirroredStrategy ms": _num(".1f", "MirroredStrategy_ms"),
            "DataParallel ms, `bucket_mb=25`": _num(".1f", "DataParallel_ms"),
            "DP / single": _num(".2f", "dp_over_single"),
        },
        note=(
            "How computed: as the step-time table (`step_time.py --shapes 2x1024 "
            "--devices 2 --bucket-mb 25`), a ratio of median epoch times in one "
            "process; compare with that table's 2x1024 row on 2 devices, measured "
            "in another run."
        ),
    ),
    "compression": Table(
        source="compression.json",
        columns={
            "task": _text("task"),
            "compression": _text("compression"),
            "sharding": lambda row, rows, settings: f"`{row['sharding']!r}`",
            "bytes/step, all collectives": _num(",.0f", "bytes_per_step"),
            "of which gathers and broadcasts": lambda row, rows, settings: format(
                row["all_gather_bytes_per_step"] + row["broadcast_bytes_per_step"],
                ",.0f",
            ),
            "of uncompressed": _num(".1%", "compression_ratio"),
            "reductions/step": _text("reductions"),
            "held-out accuracy": _num(".3f", "accuracy"),
            "step time / none": _num(".2f", "step_time_ratio"),
        },
        note=(
            "How computed: bytes are what each replica puts into every collective "
            "of a step (`communication_stats()['bytes_per_step']`: the gradients' "
            "reduction, and under a sharding of the optimizer state the all-gather "
            "of the updated weights and the broadcast of the optimizer's step "
            "counter, never compressed); `of uncompressed` is that "
            "over the same step with `compression=None` (`compression_ratio`). "
            "`step time / none` is the median throughput of the uncompressed "
            "`'auto'` setting over this setting's, each the median of 5 epochs, "
            "the settings of a task taking turns."
        ),
    ),
    "model_parallel": Table(
        source="model_parallel.json",
        columns={
            "stages": lambda row, rows, settings: (
                "single device" if row["stages"] == 1 else str(row["stages"])
            ),
            "num_microbatches": _text("num_microbatches"),
            "median step ms": _num(".1f", "step_ms"),
            "over single device": _num(".2f", "over_single"),
            "largest share of bytes on a device": _num(".0%", "largest_device_share"),
        },
        note=(
            "How computed: the setups take turns, one epoch each, for 15 rounds; "
            "`over single device` is the median over the rounds of each round's "
            "epoch time over the single device's in that round, so it is not the "
            "ratio of the two median step times shown (a slow spell moves every "
            "setup of its round, and cancels in that round's ratio)."
        ),
    ),
    "pipeline_memory": Table(
        source="pipeline_memory.json",
        columns={
            "setting": _text("setting"),
            "held for the backward, per device (graph)": lambda row, rows, s: ", ".join(
                f"{d} {size:.0f} MB" for d, size in row["held_mb"].items()
            ),
            "peak growth (process)": lambda row, rows, s: (
                f"{row['peak_growth_mb']:.0f} MB"
            ),
            "peak / GPipe's": _num(".2f", "peak_over_gpipe"),
            "step time / one device": _num(".2f", "step_over_one_device"),
        },
        note=(
            "How computed: {depth} x Dense({width}, relu), batch {batch}, "
            "{num_microbatches} micro-batches, 2 logical CPU devices. Held: the "
            "forward tensors the traced step's backward reads "
            "(`keras_parallel.graph_memory`), a stage's micro-batches counted as "
            "many as it holds at once. Peak growth: one fresh process per setting, "
            "the peak of TensorFlow's host allocator over 2 steps after a warm-up "
            "step minus what it held before them, median of {rounds} rounds; "
            "step time: median over the rounds of the fastest step over one "
            "device's."
        ),
    ),
    "remat": Table(
        source="remat.json",
        columns={
            "strategy": _text("strategy"),
            "peak growth": lambda row, rows, s: f"{row['peak_growth_mb']:.0f} MB",
            "with keras.RematScope": lambda row, rows, s: (
                f"{row['peak_growth_remat_mb']:.0f} MB"
            ),
            "ratio": _num(".2f", "remat_over_plain"),
        },
        note=(
            "How computed: 6 x Dense(512, gelu), batch 16384, built with and "
            'without `keras.RematScope(mode="activations")`; one fresh process '
            "per setting, the peak of TensorFlow's host allocator over 2 steps "
            "after a warm-up step minus what it held before them, median of "
            "{rounds} rounds."
        ),
    ),
    "pipeline_partition": Table(
        source="pipeline_partition.json",
        columns={
            "partition": _text("partition"),
            "num_microbatches": _text("num_microbatches"),
            "layers per stage": lambda row, rows, settings: (
                " + ".join(str(n) for n in row.get("layers_per_stage", [])) or "-"
            ),
            "measured ms per stage": lambda row, rows, settings: (
                " + ".join(f"{ms:.1f}" for ms in row.get("stage_ms", [])) or "-"
            ),
            "median step ms": _num(".1f", "step_ms"),
            "over single device": _num(".2f", "over_single"),
        },
        note=(
            "How computed: the setups take turns, one epoch each, for {repeats} "
            "rounds; `over single device` is the median over the rounds of each "
            "round's epoch time over the single device's in that round. A stage's "
            "measured ms is the sum of its layers' forward and backward times as "
            '`partition="time"` measures them (batch 32), measured again after '
            "training (median of 30 runs)."
        ),
    ),
    "xla": Table(
        source="xla.json",
        columns={
            "shape": _text("shape"),
            "setup": _text("setup"),
            "median step ms": _num(".1f", "step_ms"),
            "step time / one device": _num(".2f", "over_single"),
            "XLA clusters in the step": lambda row, rows, s: (
                ", ".join(f"{d}: {n}" for d, n in row["clusters"].items()) or "none"
            ),
        },
        note=(
            "How computed: batch {batch}, Adam, 2 logical CPU devices sharing 2 "
            "cores; the four setups of a shape take turns, one epoch each, for "
            "{rounds} rounds in one process; `step time / one device` is the "
            "median over the rounds of each round's epoch time over the "
            "uncompiled single device's. Clusters: the compiled clusters each "
            "device launches in a training step, from TensorFlow's executed "
            "graphs."
        ),
    ),
    "mesh": Table(
        source="mesh.json",
        columns={
            "setup": _text("setup"),
            "median step ms": _num(".1f", "step_ms"),
            "step time / one device": _num(".2f", "over_single"),
            "weights + optimizer, largest device": _mb("max_device_mb"),
            "gradient all-reduce / step / device": _mb("allreduce_mb_per_step"),
            "model-axis exchanges / step / device": _mb("exchange_mb_per_step"),
        },
        note=(
            "How computed: the setups take turns, one epoch each, for {repeats} "
            "rounds; `step time / one device` is the median over the rounds of "
            "each round's epoch time over the single device's in that round "
            "(not the ratio of the median step times). MB are 1e6 bytes."
        ),
    ),
    "sharding": Table(
        source="sharding.json",
        columns={
            "setup": _setup,
            "step time / one device": _num(".2f", "over_single"),
            "weights + Adam, largest device": _mb("max_device_mb"),
            "all-reduce": _mb("all_reduce_mb_per_step"),
            "reduce-scatter": _mb("reduce_scatter_mb_per_step"),
            "all-gather": _mb("all_gather_mb_per_step"),
            "all collectives": _mb("mb_per_step"),
            "ring traffic / step / replica": _mb("ring_mb_per_step"),
        },
        note=(
            "How computed: the setups take turns, one epoch each, for {repeats} "
            "rounds; a step time is `ThroughputMonitor`'s (the epoch's steps after "
            "its first two), and `step time / one device` is the median over the "
            "rounds of each round's ratio to the single device. Collective columns "
            "are the bytes each replica puts in per step (`communication_stats()`: "
            "its buffer of an all-reduce or reduce-scatter, its part of an "
            "all-gather); `all collectives` is their total with the owners' "
            "broadcasts of the optimizer's step counter; ring traffic is what a "
            "replica sends when each collective runs as a ring. MB are 1e6 bytes."
        ),
    ),
    "local_sgd": Table(
        source="local_sgd.json",
        columns={
            "setting": _text("setting"),
            "held-out accuracy per seed": _per_seed(".3f", relative=False),
            "vs synchronous, per seed": _per_seed("+.3f", relative=True),
            "MB / step / replica": _num(".4f", "mb_per_step"),
            "MB over the run": _num(".1f", "mb_total"),
        },
        note=(
            "How computed: {replicas} replicas, {epochs} epochs of global batch "
            "{global_batch} over {train_samples} samples, the same samples in the "
            "same order for every setting; accuracy on {held_out_samples} held-out "
            "samples, one run per seed ({seeds} seeds); `vs synchronous` subtracts "
            "the synchronous run of the same seed. MB are 1e6 bytes."
        ),
    ),
    "multi_worker": Table(
        source="multi_worker.json",
        columns={
            "model": lambda row, rows, settings: f"{row['model']} MLP",
            "1 process x 2 threads": _num(",.0f", "one_process_two_threads"),
            "2 workers x 1 thread": _num(",.0f", "two_workers_one_thread"),
            "ratio": _num(".2f", "ratio"),
            "per-round ratios": lambda row, rows, settings: ", ".join(
                f"{r:.2f}" for r in row["ratios"]
            ),
            "2 workers, `sync_every=8`": _num(",.0f", "two_workers_sync_every_8"),
            "over every step's": _num(".2f", "sync_every_8_over_every_step"),
            "its per-round ratios": lambda row, rows, settings: ", ".join(
                f"{r:.2f}" for r in row["sync_every_8_ratios"]
            ),
        },
        note=(
            "How computed: samples/s, each setup's figure the median of 5 timed "
            "epochs in a round; the setups take turns for 3 rounds; a ratio is the "
            "median of the per-round ratios (listed), so it is not the ratio of the "
            "median samples/s shown. Global batch {batch}, {samples} samples an "
            "epoch, Adam."
        ),
        settings=lambda data: {"batch": data["batch"], "samples": data["samples"]},
    ),
    "parameter_server": Table(
        source="parameter_server.json",
        columns={
            "workers": _text("workers"),
            "ParameterServer − one device, held-out accuracy per seed": _list(
                "ps_minus_one_device", "+.3f"
            ),
            "DataParallel − one device": _list("dp_minus_one_device", "+.3f"),
            "staleness mean / max": lambda row, rows, settings: (
                f"{row['mean_staleness']:.2f} / {row['max_staleness']}"
            ),
            "ParameterServer samples/s": _num(",.0f", "ps_samples_per_second"),
            "DataParallel samples/s": _num(",.0f", "dp_samples_per_second"),
            "ParameterServer / DataParallel": _num(".2f", "ps_over_dp"),
            "per-round ratios": _list("ratios", ".2f"),
        },
        note=(
            "How computed: {ps_tasks} ps tasks and n workers against synchronous "
            "`DataParallel` on the same n launched workers; {epochs} epochs of "
            "global batch {batch} over {train_samples} samples, held-out accuracy "
            "on {held_out_samples} samples, one fresh job per setup and seed "
            "({seeds} seeds; one device's accuracy per seed: "
            "{one_device_accuracies}). Staleness: the other workers' updates "
            "applied between a worker's read of the variables and its own update "
            "(`strategy.communication_stats()`), the mean over a job's updates "
            "(median over the seeds) and the largest of all. Samples/s: the job's "
            "training samples of an epoch over worker 0's median time of epochs 2 to "
            "{epochs}; the setups take turns, round k training seed k, and a ratio "
            "is the median of the per-round ratios (listed), so not the ratio of "
            "the medians shown. Every process (worker or ps) runs one thread; all "
            "share this machine's 2 cores, on loopback. Jobs that failed and were "
            "run again: {failures}."
        ),
        settings=lambda data: {
            **data["settings"],
            "failures": "; ".join(
                f"{f['setup']}, seed {f['seed']} ({f['launcher']})"
                for f in data["failures"]
            )
            or "none",
        },
    ),
    "compatibility": Table(
        source="compatibility.json",
        columns={
            "feature": _text("feature"),
            "MirroredStrategy": _text("MirroredStrategy"),
            "DataParallel": _text("DataParallel"),
            "PipelineParallel": _text("PipelineParallel"),
        },
        note=(
            "How computed: ✔ means weights and every per-batch log agree with one "
            "device to 1e-5; otherwise the cell gives the largest difference or the "
            "error (first line), one process per row."
        ),
        rows=_compatibility_rows,
    ),
    "pipeline_timeline": Table(
        source="pipeline_timeline.json",
        columns={
            "schedule": _text("schedule"),
            "stages": _text("stages"),
            "order on the first device": lambda row, rows, s: _order(row, 0),
            "order on the last device": lambda row, rows, s: _order(row, -1),
            "idle per device (measured)": lambda row, rows, s: ", ".join(
                f"{device} {found['idle_median']:.0%} "
                f"({min(found['idle_every_step']):.0%}–"
                f"{max(found['idle_every_step']):.0%})"
                for device, found in sorted(row["devices"].items())
            ),
            "(p-1)/(m+p-1)": _num(".0%", "bubble_formula"),
        },
        note=(
            "How computed: {model}, batch {batch}, {num_microbatches} "
            "micro-batches, SGD; {recorded_steps} training steps recorded one at a "
            "time by TensorFlow's profiler after a warm-up step, the settings taking "
            "turns (`benchmarks/timeline.py`). Orders: the step of median span; Fk "
            "/ Bk: micro-batch k's forward / backward, in the order they started on "
            "the device. Idle: the median over the steps (their range). {note}"
        ),
    ),
    "overlap": Table(
        source="overlap.json",
        columns={
            "bucket": _text("bucket"),
            "gradients (shapes)": lambda row, rows, s: ", ".join(
                "x".join(map(str, shape)) for shape in row["shapes"]
            ),
            "kB": lambda row, rows, s: f"{row['bytes'] / 1e3:,.1f}",
            "starts, ms from backward end": _num("+.2f", "start_ms"),
            "ends, ms from backward end": _num("+.2f", "end_ms"),
            "steps it started before the backward ended": lambda row, rows, s: (
                f"{row['steps_started_before_backward_end']} of "
                f"{len(row['start_ms_every_step'])}"
            ),
        },
        note=(
            "How computed: {model}, global batch {batch}, Adam, DataParallel on "
            "{devices} logical CPU devices, `bucket_mb={bucket_mb}`; "
            "{recorded_steps} training steps recorded one at a time by TensorFlow's "
            "profiler after warm-up steps (`benchmarks/overlap.py`, events read by "
            "`benchmarks/timeline.py`). A bucket's reduction starts with the first "
            "of its ops (packing, sum and unpacking, on either device) and ends "
            "with the last; each time is the median over the steps, in ms from the "
            "end of the backward's last op on either replica (negative: before "
            "it). The backward took a median {backward_ms_median:.1f} ms (its first "
            "op to its last), and the last bucket ended a median "
            "{tail_ms_median:.2f} ms after it. {note}"
        ),
    ),
}


def publish(name: str, data) -> None:
    """Writes a benchmark's `data` to table `name`'s result file and prints
    the table as the docs will show it."""
    path = RESULTS / TABLES[name].source
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(render(name), end="")
    print(f"\nwrote {path}")


def cells(name: str, results: pathlib.Path = RESULTS) -> list[list[str]]:
    """The table's header and rows, as the text of each cell.

    Args:
        name: A key of `TABLES`.
        results: The folder of the result files.

    Returns:
        `[header, row, ...]`, each a list of cell texts.
    """
    table = TABLES[name]
    data = json.loads((results / table.source).read_text())
    rows, settings = table.rows(data), table.settings(data)
    return [list(table.columns)] + [
        [column(row, rows, settings) for column in table.columns.values()]
        for row in rows
    ]


def note(name: str, results: pathlib.Path = RESULTS) -> str:
    """The sentence under a table saying how its figures were computed."""
    table = TABLES[name]
    data = json.loads((results / table.source).read_text())
    return table.note.format(**table.settings(data))


def render(name: str, results: pathlib.Path = RESULTS) -> str:
    """The markdown of one table and its note, as a block between markers."""
    header, *rows = cells(name, results)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return (
        "\n".join(lines)
        + "\n\n"
        + note(name, results)
        + f" Source: `benchmarks/results/{TABLES[name].source}`.\n"
    )


def refresh(text: str, results: pathlib.Path = RESULTS) -> str:
    """`text` with every marked block rendered again from `results`."""
    return BLOCK.sub(
        lambda m: m.group(1) + render(m.group("name"), results) + m.group(4), text
    )


def pages() -> list[pathlib.Path]:
    """The README and every docs page, where blocks may stand."""
    return [
        ROOT / "README.md",
        ROOT / "ARCHITECTURE.md",
        *sorted((ROOT / "docs").rglob("*.md")),
    ]


def on_page_markdown(markdown: str, **kwargs) -> str:
    """mkdocs hook: a page's tables rendered from the result files at build time."""
    return refresh(markdown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", nargs="?", choices=sorted(TABLES))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(render(args.table), end="")
        return 0
    stale = []
    for path in pages():
        text = path.read_text()
        fresh = refresh(text)
        if fresh != text:
            stale.append(path)
            if not args.check:
                path.write_text(fresh)
    for path in stale:
        print(
            ("stale: " if args.check else "refreshed: ") + str(path.relative_to(ROOT))
        )
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
