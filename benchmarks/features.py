"""The features `compatibility.py` tries: each trains a seeded model in a
strategy's scope (None: one device) and returns its final weights."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import tensorflow as tf

import keras_parallel

DEVICES = ["CPU:0", "CPU:1"]
RNG = np.random.RandomState(0)
X = RNG.rand(256, 16).astype("float32")
Y = RNG.randint(0, 10, 256)
BATCH = 64


def mirrored():
    return tf.distribute.MirroredStrategy(DEVICES)


def data_parallel():
    return keras_parallel.DataParallel(DEVICES)


def model_parallel():
    return keras_parallel.PipelineParallel(DEVICES)


def build(optimizer="sgd", model_class=keras.Sequential, **compile_kwargs):
    model = model_class(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=optimizer() if callable(optimizer) else optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def fit(strategy, data=None, build_model=build, **fit_kwargs):
    keras.utils.set_random_seed(0)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_model()
    if data is None:
        data = dict(x=X, y=Y, batch_size=BATCH)
    elif callable(data):
        data = data(strategy or tf.distribute.get_strategy())
    model.fit(**data, epochs=2, verbose=0, shuffle=False, **fit_kwargs)
    return model.get_weights()


def optimizer_option(make_optimizer):
    return lambda strategy: fit(strategy, build_model=lambda: build(make_optimizer))


def dataset(strategy=None):
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH)


class Batches(keras.utils.PyDataset):
    def __len__(self):
        return len(X) // BATCH

    def __getitem__(self, i):
        return X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH]


def generator():
    for i in itertools.cycle(range(len(X) // BATCH)):
        yield X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH]


def from_function(strategy):
    def make(context):
        return dataset().unbatch().batch(context.get_per_replica_batch_size(BATCH))

    return dict(x=strategy.distribute_datasets_from_function(make))


class ClippingModel(keras.Sequential):
    """A custom `train_step` calling `optimizer.apply` itself."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def custom_loop(strategy):
    """`optimizer.apply_gradients` inside `strategy.run`, EMA on."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build()
        optimizer = keras.optimizers.SGD(0.1, use_ema=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    for x, y in strategy.experimental_distribute_dataset(dataset()):
        step(x, y)
    return model.get_weights() + [v.numpy() for v in optimizer.variables]


def batch_norm(strategy):
    def build_model():
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    return fit(strategy, build_model=build_model)


FEATURES = {
    "`clipnorm`": optimizer_option(lambda: keras.optimizers.SGD(0.1, clipnorm=0.1)),
    "`clipvalue`": optimizer_option(lambda: keras.optimizers.SGD(0.1, clipvalue=0.01)),
    "`global_clipnorm`": optimizer_option(
        lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.1)
    ),
    "`use_ema`, `ema_overwrite_frequency`": optimizer_option(
        lambda: keras.optimizers.SGD(0.1, use_ema=True, ema_overwrite_frequency=3)
    ),
    "`gradient_accumulation_steps`": optimizer_option(
        lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=3)
    ),
    "`weight_decay` (AdamW)": optimizer_option(
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)
    ),
    "`LossScaleOptimizer`": optimizer_option(
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    ),
    "learning-rate schedule": optimizer_option(
        lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
        )
    ),
    "optimizer by name": optimizer_option(lambda: "adam"),
    "`tf.data.Dataset`": lambda s: fit(s, lambda _: dict(x=dataset())),
    "`keras.utils.PyDataset`": lambda s: fit(s, lambda _: dict(x=Batches())),
    "Python generator": lambda s: fit(
        s, lambda _: dict(x=generator(), steps_per_epoch=len(X) // BATCH)
    ),
    "`experimental_distribute_dataset`": lambda s: fit(
        s, lambda strategy: dict(x=strategy.experimental_distribute_dataset(dataset()))
    ),
    "`distribute_datasets_from_function`": lambda s: fit(s, from_function),
    "`steps_per_execution=4`": lambda s: fit(
        s, build_model=lambda: build(steps_per_execution=4)
    ),
    "`class_weight`": lambda s: fit(s, class_weight={i: 1 + i / 10 for i in range(10)}),
    "custom `train_step`": lambda s: fit(
        s,
        build_model=lambda: build(
            lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.1),
            model_class=ClippingModel,
        ),
    ),
    "custom loop (`strategy.run`, EMA)": custom_loop,
    "BatchNormalization": batch_norm,
}
