"""`keras-parallel` command line: `keras-parallel demo`."""

from __future__ import annotations

import argparse
import os
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
