"""The features `compatibility.py` tries: each trains a seeded model in a
strategy's scope (None: one device) and returns its final weights."""

from __future__ import annotations

import functools
import itertools
import os
import sys

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


# keras.io patterns (the models of tests/keras_patterns.py), in float64 so that
# any difference beyond 1e-5 is a real one; weights and per-batch logs.
TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)
import keras_patterns  # noqa: E402


def keras_io(build, batch_size=14, x=keras_patterns.X, y=keras_patterns.Y):
    def run(strategy):
        keras.backend.set_floatx("float64")
        keras.mixed_precision.set_global_policy("float64")
        model, logs, _ = keras_patterns.fit(build, strategy, batch_size, x, y)
        return model.get_weights() + [keras_patterns.log_values(logs)]

    return run


def on_batch(strategy):
    """`train_on_batch`, `test_on_batch`, `predict_on_batch` on 40, 7 and 1
    samples."""
    keras.utils.set_random_seed(0)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build("adam")
    results = []
    for size in (40, 7, 1):
        results.append(np.array(model.train_on_batch(X[:size], Y[:size])))
        results.append(np.array(model.test_on_batch(X[:size], Y[:size])))
        results.append(model.predict_on_batch(X[:size]))
    return model.get_weights() + results


IMAGES = RNG.rand(7, 6, 6, 2)


def small_batches(strategy):
    """A convnet with BatchNormalization on batches of 3 over 2 devices, the
    last of 1 sample, then `predict(x[:1])`."""

    def build_convnet():
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(3, 3),
                keras.layers.BatchNormalization(),
                keras.layers.Flatten(),
                keras.layers.Dense(10),
            ]
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
        return model

    keras.backend.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    weights = fit(strategy, dict(x=IMAGES, y=Y[:7], batch_size=3), build_convnet)
    keras.utils.set_random_seed(0)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_convnet()
    model.set_weights(weights)
    return weights + [model.predict(IMAGES[:1], verbose=0)]


def built_outside(strategy):
    """A model built outside the scope, compiled inside with Adam."""
    model = build("adam")
    with (strategy or tf.distribute.get_strategy()).scope():
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    return model.get_weights()


FEATURES.update(
    {
        "`compute_loss` overridden": keras_io(keras_patterns.loss_override),
        "custom `train_step`, its loss logged": keras_io(
            keras_patterns.custom_train_step
        ),
        "GAN: two optimizers as attributes, `global_clipnorm`": keras_io(
            functools.partial(keras_patterns.gan, keras_patterns.CallableGAN),
            y=None,
        ),
        "model without `call()` (keras.io GAN)": keras_io(keras_patterns.gan, y=None),
        "metrics in per-batch logs (Precision, AUC, counts)": keras_io(
            keras_patterns.every_metric, y=keras_patterns.LABELS
        ),
        "position embedding `range(maxlen)`, Adam": keras_io(
            functools.partial(
                keras_patterns.position_embedding,
                keras_patterns.SPARSE_OPTIMIZERS["adam"],
            ),
            batch_size=16,
            x=keras_patterns.TOKENS,
        ),
        "TextVectorization, StringLookup, ... in the model": keras_io(
            keras_patterns.preprocessing_model,
            batch_size=None,
            x=tf.data.Dataset.from_tensor_slices(
                (keras_patterns.preprocessing_inputs(), keras_patterns.Y)
            ).batch(14),
            y=None,
        ),
        "`train_on_batch`, `predict_on_batch`": on_batch,
        "fewer samples than devices (convnet, `predict(x[:1])`)": small_batches,
        "model built outside the scope, Adam": built_outside,
    }
)
