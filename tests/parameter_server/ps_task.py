"""The training job of the ParameterServer tests, run in every task.

`python ps_task.py OUT [--epochs E]` with `TF_CONFIG` set: a ps task serves
(never returns); worker i trains a small MLP with Adam under
`ParameterServer()`, then writes `OUT/worker_<i>.npz` (weights, loss per
epoch, evaluate's loss, staleness) and saves `OUT/worker_<i>.keras`. `train`
is also called without a strategy, as the one-device reference.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

BATCH = 32
SAMPLES = 256


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.1 * x[:, :1]).astype("float32")
    return x, y


def build():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


def train(strategy=None, epochs=2, callbacks=()):
    x, y = data()
    callbacks = list(callbacks)
    if strategy is None:
        model = build()
    else:
        import keras_parallel

        with strategy.scope():
            model = build()
        # Staleness in the logs of each epoch, as a user would watch it.
        callbacks.append(keras_parallel.callbacks.CommunicationMonitor())
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return model, history


COUNTING_BATCH = 8


def counting_model(strategy):
    """A model whose every update subtracts exactly 0.5 from each weight
    when trained on `counting_data` (inputs of ones, targets far below, MAE,
    SGD at 0.5), so that its final weights count the updates that reached
    them."""
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
            ]
        )
        model.compile(keras.optimizers.SGD(0.5), "mean_absolute_error")
    return model


def counting_data(samples):
    return np.ones((samples, 4), "float32"), np.full((samples, 1), -1e9, "float32")


def count_updates(strategy):
    """The weights of `counting_model` after one epoch."""
    model = counting_model(strategy)
    x, y = counting_data(SAMPLES)
    model.fit(x, y, batch_size=COUNTING_BATCH, epochs=1, verbose=0)
    return model.get_weights()[0]


def placement(strategy, model):
    """Where things are: the jobs of the model's, the optimizer's and the
    metrics' variables, and of the ops of a traced training step that do
    the forward pass (MatMul) and Adam's update (Sqrt)."""
    import tensorflow as tf

    def job(device):
        return device.split("/replica")[0]

    x, y = data()
    step = tf.function(
        lambda: strategy.run(model.train_step, args=((x[:BATCH], y[:BATCH]),))
    )
    ops = {"MatMul": set(), "Sqrt": set()}

    def walk(graph):
        for op in graph.get_operations():
            if op.type in ops:
                ops[op.type].add(job(op.device))
        for function in graph._functions.values():
            walk(function.graph)

    walk(step.get_concrete_function().graph)
    variables = {
        "model_variables": model.weights,
        "optimizer_variables": model.optimizer.variables,
        "metric_variables": model.metrics_variables,
    }
    found = {k: {job(v.value.device) for v in vs} for k, vs in variables.items()}
    return {k: np.array(sorted(v)) for k, v in {**found, **ops}.items()}


def two_inputs_two_outputs():
    """A functional model of named inputs and outputs, each output with its
    own loss, weight and metric."""
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(8, activation="tanh")(
        keras.layers.Concatenate()([a, b])
    )
    value = keras.layers.Dense(1, name="value")(hidden)
    sign = keras.layers.Dense(1, activation="sigmoid", name="sign")(hidden)
    model = keras.Model({"a": a, "b": b}, {"value": value, "sign": sign})
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss={"value": "mse", "sign": "binary_crossentropy"},
        loss_weights={"value": 1.0, "sign": 0.5},
        metrics={"sign": ["accuracy"]},
    )
    return model


def keras_patterns(strategy) -> dict:
    """keras.io patterns (subclassed models, custom `compute_loss` and
    `train_step`, GANs with two optimizers, every metric) and a model of two
    inputs and outputs, trained in float64 under `strategy` and without:
    {name: (largest weight difference, largest per-batch log difference)}."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
    from keras_patterns import LABELS, PATTERNS, X, Y, fit, max_logs_diff
    from transparency import max_weight_diff

    cases = {name: (build, dict(y=y)) for name, (build, y) in PATTERNS.items()}
    inputs = {"a": X[:, :3], "b": X[:, 3:]}
    targets = {"value": Y, "sign": LABELS}
    cases["two_inputs_two_outputs"] = (
        two_inputs_two_outputs,
        dict(x=inputs, y=targets),
    )
    keras.backend.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    found = {}
    for name, (build, data) in sorted(cases.items()):
        reference, reference_logs, _ = fit(build, None, 16, **data)
        model, logs, _ = fit(build, strategy, 16, **data)
        found[f"pattern_{name}"] = np.array(
            [max_weight_diff(model, reference), max_logs_diff(logs, reference_logs)]
        )
    keras.backend.set_floatx("float32")
    keras.mixed_precision.set_global_policy("float32")
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import keras_parallel

    strategy = keras_parallel.ParameterServer()
    print(strategy, flush=True)
    model, history = train(strategy, args.epochs)
    x, y = data()
    evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    index = strategy.worker_index
    model.save(args.out / f"worker_{index}.keras")
    stats = strategy.communication_stats()
    alone = strategy.num_workers == 1
    where = placement(strategy, model) if alone else {}
    patterns = keras_patterns(strategy) if alone else {}
    counted = count_updates(strategy)
    print("staleness", stats, flush=True)
    np.savez(
        args.out / f"worker_{index}.npz",
        *model.get_weights(),
        loss=np.array(history.history["loss"]),
        logged_staleness=np.array(
            [history.history["mean_staleness"], history.history["max_staleness"]]
        ),
        evaluated=np.array(evaluated),
        **{k: np.array(v) for k, v in stats.items()},
        **where,
        **patterns,
        counted=counted,
    )


if __name__ == "__main__":
    main()
