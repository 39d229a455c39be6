"""Step time of DataParallel against one device and MirroredStrategy under `fit`.

Each (model, devices, steps_per_execution) runs in its own process, since the
device layout is fixed per process and MirroredStrategy cannot be re-created
for another model shape in one (tensorflow/tensorflow#62790). Within a process
the three setups train side by side, one epoch each in turn, so machine noise
hits them alike; the figure is the median epoch time over `--repeats` epochs
after a warm-up epoch, divided by the steps per epoch.

Usage:
    python benchmarks/step_time.py                # full table: results/step_time.json
    python benchmarks/step_time.py --shapes 2x16 --devices 2   # step_time_partial.json
    python benchmarks/step_time.py --shapes 2x1024 --devices 2 --bucket-mb 25
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from mlp import SAMPLES, build_mlp, make_data

BATCH = 256
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(
    shape: str,
    num_devices: int,
    steps_per_execution: int,
    repeats: int,
    bucket_mb: float | None,
):
    """Runs in a worker process; returns step times in ms per setup."""
    import keras_parallel

    devices = keras_parallel.virtual_devices(num_devices)
    import tensorflow as tf

    depth, width = (int(v) for v in shape.split("x"))
    x, y = make_data()

    def build(strategy):
        return build_mlp(strategy, depth, width, steps_per_execution)

    setups = {
        "single": tf.distribute.get_strategy(),
        "DataParallel": keras_parallel.DataParallel(devices, bucket_mb=bucket_mb),
        "MirroredStrategy": tf.distribute.MirroredStrategy(devices),
    }
    models, errors = {}, {}
    for name, strategy in setups.items():
        try:
            models[name] = build(strategy)
            models[name].fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        except Exception as error:  # a failing setup is a result, e.g. Mirrored + spe
            models.pop(name, None)
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            times[name].append(time.perf_counter() - start)
    steps = SAMPLES // BATCH
    step_ms = {name: 1000 * statistics.median(t) / steps for name, t in times.items()}
    return {"step_ms": step_ms, "errors": errors}


def ratio(a, b):
    return None if a is None or b is None else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2x16", "40x64", "2x1024"])
    parser.add_argument("--devices", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps-per-execution", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--bucket-mb", type=float, help="DataParallel's bucket_mb (default: its own)"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, n, spe = args.worker
        result = measure(shape, int(n), int(spe), args.repeats, args.bucket_mb)
        print(json.dumps(result))
        return

    rows = []
    for spe in args.steps_per_execution:
        for n in args.devices:
            for shape in args.shapes:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--repeats",
                        str(args.repeats),
                        "--worker",
                        shape,
                        str(n),
                        str(spe),
                    ]
                    + (
                        []
                        if args.bucket_mb is None
                        else ["--bucket-mb", str(args.bucket_mb)]
                    ),
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                ms = result["step_ms"]
                rows.append(
                    {
                        "model": shape,
                        "devices": n,
                        "steps_per_execution": spe,
                        **{f"{k}_ms": v for k, v in ms.items()},
                        "dp_over_single": ratio(
                            ms.get("DataParallel"), ms.get("single")
                        ),
                        "dp_over_mirrored": ratio(
                            ms.get("DataParallel"), ms.get("MirroredStrategy")
                        ),
                        "errors": result["errors"],
                    }
                )
                print(format_row(rows[-1]), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    # step_time.json is the full table the docs show: a run of other shapes,
    # devices or steps per execution must not replace it.
    full = all(
        getattr(args, name) == parser.get_default(name)
        for name in ("shapes", "devices", "steps_per_execution")
    )
    suffix = "" if args.bucket_mb is None else f"_bucket_mb_{args.bucket_mb:g}"
    path = os.path.join(
        RESULTS, f"step_time{suffix}{'' if full or suffix else '_partial'}.json"
    )
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print()
    print(format_table(rows))
    print(f"\nwrote {path}")


def _num(value, spec):
    return "fails" if value is None else format(value, spec)


def format_row(row) -> str:
    return (
        f"| {row['model']} | {row['devices']} | {row['steps_per_execution']} "
        f"| {_num(row.get('single_ms'), '.1f')} "
        f"| {_num(row.get('MirroredStrategy_ms'), '.1f')} "
        f"| {_num(row.get('DataParallel_ms'), '.1f')} "
        f"| {_num(row['dp_over_single'], '.2f')} "
        f"| {_num(row['dp_over_mirrored'], '.2f')} |"
    )


def format_table(rows) -> str:
    header = (
        "| model | devices | steps_per_execution | single ms | MirroredStrategy ms "
        "| DataParallel ms | DP / single | DP / Mirrored |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([header] + [format_row(r) for r in rows])


if __name__ == "__main__":
    main()
