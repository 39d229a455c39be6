"""The held-out accuracy job of the ParameterServer tests, run in every task.

`python accuracy_task.py OUT` with `TF_CONFIG` set: a ps task serves (never
returns); worker i trains one model per seed of `SEEDS`, one after another
under the same `ParameterServer()`, and writes `OUT/worker_<i>.npz`: each
seed's held-out accuracy and final weights, and the worker's staleness.
`train` is also called without a strategy, as the one-device reference.

The task is `keras_parallel.demo.teacher_task` (Gaussian inputs labelled by
a random tanh teacher network) at a size where a small MLP ends near 0.85
held-out accuracy after `EPOCHS` epochs: far from chance (the largest class
is about a third of the samples) and from 1.0, so that a worker reading
wrong or lost variables shows in it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_parallel.demo import teacher_task  # noqa: E402

SEEDS = (0, 1, 2)
TRAIN, HELD_OUT, FEATURES, CLASSES = 2048, 1024, 16, 4
BATCH, EPOCHS = 64, 3


def train(seed: int, strategy=None) -> tuple[keras.Model, float]:
    """A small MLP trained on seed `seed`'s task (its data and its
    initialisation) in `strategy`'s scope; the model and its held-out
    accuracy."""
    (x, y), (x_held_out, y_held_out) = teacher_task(
        TRAIN, HELD_OUT, seed, FEATURES, CLASSES
    )
    keras.utils.set_random_seed(seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    _, accuracy = model.evaluate(x_held_out, y_held_out, batch_size=256, verbose=0)
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    args = parser.parse_args()
    import keras_parallel

    strategy = keras_parallel.ParameterServer()
    found = {}
    for seed in SEEDS:
        model, accuracy = train(seed, strategy)
        found[f"accuracy_{seed}"] = np.array(accuracy)
        for i, weight in enumerate(model.get_weights()):
            found[f"weights_{seed}_{i}"] = weight
    stats = strategy.communication_stats()
    print("staleness", stats, flush=True)
    found.update({k: np.array(v) for k, v in stats.items()})
    np.savez(args.out / f"worker_{strategy.worker_index}.npz", **found)


if __name__ == "__main__":
    main()
