"""The main job: one convnet trained on one device, MirroredStrategy and
DataParallel, compared in a table."""

from __future__ import annotations

import statistics
import time

import numpy as np

IMAGE = 16
CLASSES = 4


def make_data(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 16x16 images of a bar in one of four orientations (the label)."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, CLASSES, samples)
    images = rng.normal(0.0, 0.3, (samples, IMAGE, IMAGE, 1)).astype("float32")
    line = np.arange(2, IMAGE - 2)
    for i, label in enumerate(labels):
        offset = rng.randint(-3, 4)
        position = np.clip(IMAGE // 2 + offset, 0, IMAGE - 1)
        rows, cols = {
            0: (np.full_like(line, position), line),
            1: (line, np.full_like(line, position)),
            2: (line, np.clip(line + offset, 0, IMAGE - 1)),
            3: (line, np.clip(IMAGE - 1 - line + offset, 0, IMAGE - 1)),
        }[label]
        images[i, rows, cols, 0] += 1.0
    return images, labels


def build_model():
    """A small convnet (71k parameters, most in two wide layers)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((IMAGE, IMAGE, 1)),
            keras.layers.Conv2D(32, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(128, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train(strategy, data, batch_size: int, epochs: int, verbose: int):
    """Builds a freshly seeded model in `strategy`'s scope and fits it."""
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model()
    x, y = data
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=verbose
    )
    return model


def teacher_task(
    samples: int, held_out: int, seed: int, features: int = 32, classes: int = 10
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Gaussian inputs labelled by a random two-layer tanh teacher network:
    a task a small MLP learns only part of in a few epochs, so training
    settings show in its held-out accuracy.

    Returns:
        `((x, y), (x_held_out, y_held_out))`.
    """
    rng = np.random.RandomState(seed)
    first = rng.normal(0, 1 / np.sqrt(features), (features, 64))
    second = rng.normal(0, 1 / np.sqrt(64), (64, classes))
    x = rng.normal(size=(samples + held_out, features)).astype("float32")
    y = np.argmax(np.tanh(np.tanh(x @ first) @ second), axis=1)
    return (x[:samples], y[:samples]), (x[samples:], y[samples:])


def epoch_times(
    models: dict, data, batch_size: int, rounds: int = 3, steady: bool = False
) -> dict:
    """Seconds of one epoch of each model, per round.

    The models take turns, one epoch each, so that noise from the rest of the
    machine hits them alike; the first to go changes every round.

    Args:
        models: `{name: compiled model}`.
        data: `(x, y)`, one epoch.
        batch_size: The global batch size.
        rounds: Epochs of each model.
        steady: Time only the steps after the first two of each epoch
            (`ThroughputMonitor`), as seconds per step, instead of the whole
            `fit` call; an epoch's start (its iterator, callbacks) is left out.

    Returns:
        `{name: [seconds of each round]}`.
    """
    from keras_parallel.callbacks import ThroughputMonitor

    x, y = data
    names = list(models)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            monitor = [ThroughputMonitor(batch_size)] if steady else None
            start = time.perf_counter()
            history = models[name].fit(
                x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=monitor
            )
            seconds = time.perf_counter() - start
            if steady:
                seconds = history.history["step_time_ms"][0] / 1000
            times[name].append(seconds)
    return times


def samples_per_second(models: dict, data, batch_size: int, rounds: int = 3) -> dict:
    """Median throughput of each trained model over `rounds` epochs (see
    `epoch_times`)."""
    times = epoch_times(models, data, batch_size, rounds)
    return {name: len(data[0]) / statistics.median(t) for name, t in times.items()}


def max_weight_diff(a, b) -> float:
    """Largest absolute difference between the weights of two models."""
    return max(
        float(np.max(np.abs(u - v)))
        for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
    )


def run(devices: list[str], batch_size: int, epochs: int, samples: int) -> dict:
    """Trains the demo model three ways and returns the figures of the table."""
    import tensorflow as tf

    import keras_parallel

    train_data = make_data(samples, seed=1)
    x_test, y_test = make_data(1024, seed=2)
    print(f"Single device ({devices[0]})")
    single = train(tf.distribute.get_strategy(), train_data, batch_size, epochs, 0)
    print(f"DataParallel on {len(devices)} devices")
    parallel = train(
        keras_parallel.DataParallel(devices), train_data, batch_size, epochs, verbose=1
    )
    print(f"MirroredStrategy on {len(devices)} devices")
    mirrored = train(
        tf.distribute.MirroredStrategy(devices), train_data, batch_size, epochs, 0
    )
    accuracy = parallel.evaluate(x_test, y_test, batch_size=batch_size, verbose=0)[1]
    weight_diff = max_weight_diff(parallel, single)
    # One step isolates the computation; over many steps float rounding from
    # summing per-replica gradients (instead of one full-batch gradient)
    # compounds, as it does between any two devices.
    first_batch = (train_data[0][:batch_size], train_data[1][:batch_size])
    one_step = max_weight_diff(
        train(keras_parallel.DataParallel(devices), first_batch, batch_size, 1, 0),
        train(tf.distribute.get_strategy(), first_batch, batch_size, 1, 0),
    )
    print("Timing five more epochs of each, taking turns")
    times = epoch_times(
        {"single": single, "MirroredStrategy": mirrored, "DataParallel": parallel},
        train_data,
        batch_size,
        rounds=5,
    )
    rates = {
        name: len(train_data[0]) / statistics.median(t) for name, t in times.items()
    }
    # Per-round ratios cancel the machine's slow spells, which hit one round.
    speedup = statistics.median(
        m / d
        for m, d in zip(times["MirroredStrategy"], times["DataParallel"], strict=True)
    )
    return {
        "devices": devices,
        "global_batch": batch_size,
        "samples_per_second": rates,
        "speedup_over_mirrored": speedup,
        "test_accuracy": float(accuracy),
        "epochs": epochs,
        "max_weight_diff_one_step": one_step,
        "max_weight_diff_after_training": weight_diff,
    }


def format_table(result: dict) -> str:
    """The summary table printed at the end of the demo."""
    from keras_parallel.devices import short_device

    rates = result["samples_per_second"]
    rows = [
        ("devices", ", ".join(map(short_device, result["devices"]))),
        ("global batch", str(result["global_batch"])),
        *((f"samples/s, {name}", f"{rate:,.0f}") for name, rate in rates.items()),
        (
            "DataParallel / MirroredStrategy",
            f"{result['speedup_over_mirrored']:.2f}x throughput"
            " (median of per-round ratios)",
        ),
        ("test accuracy (DataParallel)", f"{result['test_accuracy']:.3f}"),
        ("max |w - w_single|, one step", f"{result['max_weight_diff_one_step']:.1e}"),
        (
            f"max |w - w_single|, {result['epochs']} epochs",
            f"{result['max_weight_diff_after_training']:.1e}"
            " (float rounding, compounded)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
