"""`keras-parallel` command line: `keras-parallel demo` and `keras-parallel launch`."""

from __future__ import annotations

import argparse
import os
import sys

from keras_parallel.launch import NETWORKS, TIMEOUT, launch


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, got {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: never), got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="keras-parallel", description="Parallel Keras training on one machine."
    )
    commands = main.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a small convnet on one device, MirroredStrategy and "
        "DataParallel, and compare",
    )
    demo.add_argument(
        "--devices",
        type=_positive,
        default=2,
        help="logical CPU devices to create when the machine has no GPU (default 2)",
    )
    demo.add_argument("--batch-size", type=_positive, default=256)
    demo.add_argument("--epochs", type=_positive, default=3)
    demo.add_argument("--samples", type=_positive, default=8192)
    launcher = commands.add_parser(
        "launch",
        help="run a training script as N local TensorFlow workers, each with its "
        "TF_CONFIG, so that keras_parallel.DataParallel() in the script trains "
        "across them",
    )
    launcher.add_argument(
        "-n",
        "--num-workers",
        type=_positive,
        default=2,
        help="number of worker processes (default 2)",
    )
    launcher.add_argument(
        "--ps",
        type=_count,
        default=0,
        help="parameter-server tasks to start besides the workers, for "
        "keras_parallel.ParameterServer (default 0); with them a worker that "
        "dies or stalls is reported and the others go on",
    )
    launcher.add_argument(
        "--max-restarts",
        type=_count,
        default=0,
        help="when a worker dies or stalls, stop all workers and start them "
        "again, at most this many times in all (with --ps: that worker "
        "alone); keras_parallel.callbacks.BackupAndRestore resumes from the "
        "last finished epoch. Each task reads how often it was started before "
        "in KERAS_PARALLEL_RESTART_COUNT (default 0: never restart)",
    )
    launcher.add_argument(
        "--timeout",
        type=_seconds,
        default=TIMEOUT,
        help="seconds without progress after which workers waiting inside a "
        "step are stalled: the launcher names the worker furthest behind, "
        "has every worker print its Python stacks, and stops (or restarts) "
        f"them (default {TIMEOUT:g}; 0: never)",
    )
    launcher.add_argument(
        "--port",
        type=int,
        help="worker i listens on 127.0.0.1:PORT+i (default: free ports)",
    )
    launcher.add_argument(
        "--network",
        choices=NETWORKS,
        default="private",
        help="private (default): the workers share a network of their own with "
        "only loopback, unreachable from other machines; host: this machine's "
        "network (needed to download anything; opens the workers' ports)",
    )
    launcher.add_argument("script", help="the training script")
    launcher.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for the script"
    )
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "launch":
        try:
            return launch(
                args.script,
                args.args,
                args.num_workers,
                args.port,
                network=args.network,
                num_ps=args.ps,
                max_restarts=args.max_restarts,
                timeout=args.timeout,
            )
        except ValueError as error:
            print(f"keras-parallel launch: {error}", file=sys.stderr)
            return 2
    return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the `launch` path needs no TensorFlow.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    import keras_parallel
    from keras_parallel import demo

    if tf.config.list_physical_devices("GPU"):
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    else:
        devices = keras_parallel.virtual_devices(args.devices)
    result = demo.run(devices, args.batch_size, args.epochs, args.samples)
    print()
    print(demo.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
