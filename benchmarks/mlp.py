"""The Dense MLP and data the step-time benchmarks train."""

from __future__ import annotations

SAMPLES, FEATURES, CLASSES = 4096, 64, 10


def make_data():
    """Random inputs and labels (the step time does not depend on them)."""
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.rand(SAMPLES, FEATURES).astype("float32")
    return x, rng.randint(0, CLASSES, SAMPLES)


def build_mlp(strategy, depth: int, width: int, steps_per_execution: int = 1):
    """A freshly seeded `depth` x `width` ReLU MLP with Adam, built and
    compiled in `strategy`'s scope."""
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((FEATURES,))]
            + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
            + [keras.layers.Dense(CLASSES)]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=steps_per_execution,
        )
    return model


def build_square_mlp(strategy, depth: int, width: int):
    """A freshly seeded `depth` x Dense(`width`, relu) on `width` inputs,
    SGD on the mean squared error (trained to reproduce its input), built
    and compiled in `strategy`'s scope: every layer's activations are the
    batch times `width`, the memory pipelines are about."""
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((width,))]
            + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        )
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def build_student(strategy, features: int, classes: int):
    """The student MLP of the teacher task (`keras_parallel.demo.teacher_task`):
    2 x Dense(128, relu) on `features` inputs, `classes` logits, Adam (1e-3),
    sparse cross-entropy and accuracy, built and compiled in `strategy`'s
    scope (seed Keras first)."""
    import keras

    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((features,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(classes),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return model


def epoch_timer(times: list):
    """A callback that appends each epoch's seconds to `times`, from
    `on_epoch_begin` to `on_epoch_end`."""
    import time

    import keras

    return keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.append(
            time.perf_counter() - times.pop()
        ),
    )
