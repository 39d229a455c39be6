"""Held-out accuracy and bytes of local SGD and DiLoCo against synchronous
training, on 4 replicas.

The task (`keras_parallel.demo.teacher_task`): 32 Gaussian inputs labelled
by a random teacher network (two tanh layers, 10 classes), 16,384 training
and 4,096 held-out samples; a
student MLP (2 x 128, ReLU) with Adam (1e-3) learns it from 4 epochs of
global batch 128 (512 steps). Settings: synchronous `DataParallel` and
`sync_every` 4 and 16, each with the plain average and with DiLoCo's outer
Nesterov SGD (0.7, momentum 0.9; Douillard et al. 2023), every one from the
same samples in the same order, for `--seeds` seeds (model initialisation
and data); synchronous training keeps the whole optimizer state on every
device (`sharding=None`), as local SGD does. Bytes are what each replica puts
into the step's collectives (`communication_stats()`: all-reduces of the
gradients, or of the weights' changes at a meeting), per step and over the
run.

Usage:
    python benchmarks/local_sgd.py              # ~3 min, writes results/local_sgd.json
    python benchmarks/local_sgd.py --seeds 1    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import tables
from mlp import build_student

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FEATURES, CLASSES, TRAIN, HELD_OUT = 32, 10, 16384, 4096
BATCH, EPOCHS, REPLICAS = 128, 4, 4
SETTINGS = {
    "synchronous": (1, False),
    "local SGD, H=4": (4, False),
    "local SGD, H=16": (16, False),
    "DiLoCo, H=4": (4, True),
    "DiLoCo, H=16": (16, True),
}


def train(setting: str, seed: int) -> dict:
    import keras

    import keras_parallel
    from keras_parallel.demo import teacher_task

    sync_every, outer = SETTINGS[setting]
    strategy = keras_parallel.DataParallel(
        [f"CPU:{i}" for i in range(REPLICAS)],
        # Whole optimizer state on every device, as local SGD keeps it: the
        # settings differ only in how often the replicas meet.
        sharding=None,
        sync_every=sync_every,
        outer_optimizer=(
            keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True) if outer else None
        ),
    )
    (x, y), (x_test, y_test) = teacher_task(TRAIN, HELD_OUT, seed, FEATURES, CLASSES)
    keras.utils.set_random_seed(seed)
    model = build_student(strategy, FEATURES, CLASSES)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    stats = strategy.communication_stats()
    steps = EPOCHS * TRAIN // BATCH
    return {
        "accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1]),
        "bytes_per_step": stats["bytes_per_step"],
        "bytes_total": stats["bytes_per_step"] * steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    import keras_parallel

    keras_parallel.virtual_devices(REPLICAS)
    rows = []
    for setting in SETTINGS:
        runs = [train(setting, seed) for seed in range(args.seeds)]
        accuracies = [r["accuracy"] for r in runs]
        rows.append(
            {
                "setting": setting,
                "accuracies": accuracies,
                "accuracy_mean": statistics.mean(accuracies),
                "mb_per_step": runs[0]["bytes_per_step"] / 1e6,
                "mb_total": runs[0]["bytes_total"] / 1e6,
            }
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "local_sgd.json"), "w") as f:
        json.dump(
            {
                "settings": {
                    "replicas": REPLICAS,
                    "global_batch": BATCH,
                    "epochs": EPOCHS,
                    "train_samples": TRAIN,
                    "held_out_samples": HELD_OUT,
                    "seeds": args.seeds,
                    "mb": "1e6 bytes",
                },
                "rows": rows,
            },
            f,
            indent=2,
        )

    print(tables.render("local_sgd"), end="")


if __name__ == "__main__":
    main()
