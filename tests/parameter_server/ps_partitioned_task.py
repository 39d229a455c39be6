"""The training job of the partitioned-variable ParameterServer tests.

`python ps_partitioned_task.py OUT` with `TF_CONFIG` set: a ps task serves;
worker i trains an Embedding model (Dropout, Adam) under `ParameterServer`
with every weight of two or more rows split in two, then writes
`OUT/worker_<i>.npz` and saves `OUT/worker_<i>.keras`. `train` without a
strategy is the one-device reference.

With one worker it also records where things are (the row ranges and Adam's
slots, the ops of a traced step that touch them, the Dropout's seed state)
and `set_weights`/`get_weights` and checkpoint round trips. With several,
the data has a last batch of one row (fewer than the workers), and after
saving the trained model the worker records what `fit` on an endless
dataset with `steps_per_epoch` raised, a `fit` whose validation data is
endless, and what `fit` raised for a `train_step` returning its own logs on
such data.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH = 8
VOCABULARY = 40
EPOCHS = 2


def data(samples: int):
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCABULARY, size=(samples, 3)).astype("int32")
    y = np.sin(x.sum(axis=1, keepdims=True) / 10).astype("float32")
    return x, y


def build():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 4),
            keras.layers.Dropout(0.25),
            keras.layers.Flatten(),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    # EMA: at the end of fit the weights take their averages, an update
    # with another split variable as its argument.
    model.compile(optimizer=keras.optimizers.Adam(0.02, use_ema=True), loss="mse")
    return model


def train(strategy=None, samples=64):
    x, y = data(samples)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build()
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model, history


def placement(strategy, model) -> dict:
    """Jobs and tasks of the table's row ranges, of Adam's slots for it, of
    the ops of a traced training step that use each row range (by type), and
    of the Dropout seed state's variable and ops."""
    table = model.layers[0].embeddings.value
    slots = [
        v.value
        for v in model.optimizer.variables
        if getattr(v.value, "full_shape", None) == table.full_shape
    ]
    seed = model.layers[1].seed_generator.state.value
    x, y = data(BATCH)
    step = tf.function(lambda: strategy.run(model.train_step, args=((x, y),)))
    graph = step.get_concrete_function().graph
    inner = {id(outer): inside for outer, inside in graph.captures}

    def users(handle) -> list[str]:
        placeholder = inner.get(id(handle))
        if placeholder is None:
            return []
        return sorted({f"{op.type} {op.device}" for op in placeholder.consumers()})

    # The rows a step's gather brings to the worker: each row range's
    # gathered rows, and every tensor read from a row range that reaches an
    # op on the worker.
    to_worker = set()
    for part in table.shards:
        placeholder = inner[id(part.handle)]
        for op in placeholder.consumers():
            for out in op.outputs:
                for user in out.consumers():
                    if "/job:worker" in user.device:
                        to_worker.add(f"{op.type} {out.shape}")
    return {
        "table_shards": np.array([p.device for p in table.shards]),
        "table_rows": np.array([p.shape[0] for p in table.shards]),
        "slot_shards": np.array([[p.device for p in s.shards] for s in slots]),
        "shard_users": np.array(
            [f"{k} {u}" for k, p in enumerate(table.shards) for u in users(p.handle)]
        ),
        "to_worker": np.array(sorted(to_worker)),
        "seed_variable": np.array(seed.device),
        "seed_users": np.array(users(seed.handle)),
    }


def round_trip(model, folder: pathlib.Path) -> float:
    """The largest error of get_weights after set_weights of changed values,
    and after a tf.train.Checkpoint written and read back."""
    before = model.get_weights()
    changed = [w + 1.0 for w in before]
    model.set_weights(changed)
    errors = [_error(model.get_weights(), changed)]
    checkpoint = tf.train.Checkpoint(model=model)
    path = checkpoint.write(str(folder / "checkpoint"))
    model.set_weights(before)
    checkpoint.read(path)
    errors.append(_error(model.get_weights(), changed))
    model.set_weights(before)
    return max(errors)


def _error(found, expected) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(found, expected, strict=True))


def small(strategy, cls=keras.Sequential):
    """A small model of class `cls`, with no EMA: a worker ending `fit`
    assigns the averages to the shared weights while a slower one may still
    be validating."""
    with strategy.scope():
        model = cls(
            [
                keras.Input((3,), dtype="int32"),
                keras.layers.Embedding(VOCABULARY, 1),
                keras.layers.Flatten(),
                keras.layers.Dense(1),
            ]
        )
        model.compile("sgd", "mse")
    return model


def endless_fit(strategy) -> dict:
    """What `fit` raised for endless training data; the validation loss of
    a `fit` with endless validation data, and `evaluate`'s of that data
    after it."""
    model = small(strategy)
    x, y = data(32)
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    try:
        model.fit(endless, steps_per_epoch=2, epochs=1, verbose=0)
        raised = ""
    except ValueError as error:
        raised = str(error)
    history = model.fit(
        x, y, batch_size=BATCH, validation_data=endless, validation_steps=2, verbose=0
    )
    return {
        "endless": np.array(raised),
        "validated": np.array(history.history["val_loss"][-1]),
        "evaluated_after": np.array(model.evaluate(endless, steps=2, verbose=0)),
    }


class OwnLogs(keras.Sequential):
    """A model whose `train_step` returns its own logs."""

    def train_step(self, data):
        return {"own": super().train_step(data)["loss"]}


def own_logs_fit(strategy) -> str:
    """What `fit` raises for a model whose `train_step` returns other logs
    than its metrics, on data with a batch smaller than the workers."""
    model = small(strategy, OwnLogs)
    x, y = data(BATCH + 1)
    try:
        model.fit(x, y, batch_size=BATCH, verbose=0)
    except ValueError as error:
        return str(error)
    return ""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    import keras_parallel

    partitioners = tf.distribute.experimental.partitioners
    strategy = keras_parallel.ParameterServer(
        variable_partitioner=partitioners.FixedShardsPartitioner(2)
    )
    model, history = train(strategy, args.samples)
    x, y = data(args.samples)
    index = strategy.worker_index
    model.save(args.out / f"worker_{index}.keras")
    trained = {
        "evaluated": np.array(model.evaluate(x, y, batch_size=BATCH, verbose=0)),
        "loss": np.array(history.history["loss"]),
        **{k: np.array(v) for k, v in strategy.communication_stats().items()},
    }
    weights = model.get_weights()
    if strategy.num_workers == 1:
        trained.update(placement(strategy, model))
        trained["round_trip"] = np.array(round_trip(model, args.out))
    else:
        trained.update(endless_fit(strategy))
        trained["own_logs"] = np.array(own_logs_fit(strategy))
    np.savez(args.out / f"worker_{index}.npz", *weights, **trained)


if __name__ == "__main__":
    main()
