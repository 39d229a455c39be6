"""Models written as the keras.io examples write them (custom `compute_loss`,
custom `train_step`, a GAN with its own optimizers, ...), for the tests that
train them on one device and under a strategy: float64, seeded, small."""

from __future__ import annotations

import functools
import re

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from transparency import train

RNG = np.random.RandomState(3)
X = RNG.normal(size=(64, 6))
Y = RNG.normal(size=(64, 1))


class BatchLogs(keras.callbacks.Callback):
    """Records every `on_train_batch_end` log, as a progress bar shows it."""

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(v) for k, v in logs.items()})


class TwoLayers(keras.Model):
    """A subclassed regressor with a loss tracker of its own."""

    def __init__(self, activation="tanh"):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation=activation)
        self.out = keras.layers.Dense(1)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.out(self.hidden(x))


class LossOverride(TwoLayers):
    """`compute_loss` overridden as in Keras' own docstring of it."""

    def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
        loss = ops.mean(ops.square(y_pred - y))
        loss += ops.sum(self.losses) if self.losses else 0.0
        self.loss_tracker.update_state(loss)
        return loss

    @property
    def metrics(self):
        return [self.loss_tracker]


def loss_override():
    model = LossOverride()
    # Plain SGD: a gradient N times too large moves the weights N times as
    # far (Adam would hide it).
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


class CustomTrainStep(keras.Model):
    """keras.io's "Customizing what happens in fit()": its own step, Keras'
    compiled loss and metrics, and the loss it computed logged."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {"raw_loss": loss, **{m.name: m.result() for m in self.metrics}}


def custom_train_step():
    model = CustomTrainStep()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse", metrics=["mae"]
    )
    return model


class HandWrittenStep(TwoLayers):
    """A `train_step` with a hand-written loss and its own trackers."""

    def __init__(self):
        super().__init__()
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = keras.losses.mean_squared_error(y, y_pred)
            loss = ops.mean(loss)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


def hand_written_step():
    model = HandWrittenStep()
    model.compile(optimizer=keras.optimizers.Adam(0.01, global_clipnorm=0.5))
    return model


def every_metric():
    """Keras' own step and the metrics it ships: means, counts, ratios, AUC."""
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.BinaryAccuracy(threshold=0.0),
            keras.metrics.TruePositives(thresholds=0.0),
            keras.metrics.FalseNegatives(thresholds=0.0),
            keras.metrics.Precision(thresholds=0.0),
            keras.metrics.Recall(thresholds=0.0),
            keras.metrics.AUC(from_logits=True, num_thresholds=50),
            keras.metrics.MeanSquaredError(),
        ],
    )
    return model


class TokenAndPositionEmbedding(keras.layers.Layer):
    """keras.io's text classification with a transformer: token ids looked up
    from the batch (repeated), positions from `range(maxlen)`."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = keras.layers.Embedding(vocab_size, embed_dim)
        self.pos_emb = keras.layers.Embedding(maxlen, embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = self.pos_emb(ops.arange(start=0, stop=maxlen, step=1))
        return self.token_emb(x) + positions


TOKENS = RNG.randint(0, 5, size=(64, 8))


def position_embedding(make_optimizer):
    inputs = keras.Input((8,), dtype="int32")
    x = TokenAndPositionEmbedding(8, 5, 4)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=make_optimizer(), loss="mse")
    return model


SPARSE_OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.05),
    "adamw": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
    "adagrad": lambda: keras.optimizers.Adagrad(0.5),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.05),
}


class GAN(keras.Model):
    """keras.io's DCGAN (overriding `train_step`): two optimizers kept as the
    model's own attributes, trackers in `metrics`, no `call()`. The latent
    vectors come from the batch instead of a random generator, so that one
    device and the replicas draw the same ones."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)]
        )
        self.generator = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(6)]
        )

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def train_step(self, real):
        if isinstance(real, tuple):
            real = real[0]
        batch_size = ops.shape(real)[0]
        latent = ops.tanh(real[:, :3] - real[:, 3:])
        generated = self.generator(latent)
        combined = ops.concatenate([generated, real], axis=0)
        labels = ops.concatenate(
            [ops.ones((batch_size, 1)), ops.zeros((batch_size, 1))], axis=0
        )
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(combined))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights, strict=True)
        )
        misleading = ops.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(latent))
            g_loss = self.loss_fn(misleading, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(
            zip(grads, self.generator.trainable_weights, strict=True)
        )
        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


class CallableGAN(GAN):
    """The same GAN with a `call()` (the discriminator's verdict)."""

    def call(self, x):
        return self.discriminator(x)


def gan(cls=GAN):
    model = cls()
    model.compile(
        d_optimizer=keras.optimizers.Adam(0.01, global_clipnorm=0.1),
        g_optimizer=keras.optimizers.Adam(0.01, global_clipnorm=0.1),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return model


WORDS = ["the cat", "a dog sat", "the dog", "cats and dogs", "a cat sat on the mat"]
COLOURS = ["red", "green", "blue"]


def preprocessing_inputs() -> dict:
    """Text, categories, integer ids and numbers, as keras.io's structured
    data and end-to-end text examples feed them."""
    return {
        "text": np.array(WORDS, dtype=object)[RNG.randint(0, 5, 64)],
        "colour": np.array(COLOURS, dtype=object)[RNG.randint(0, 3, (64, 1))],
        "ids": RNG.randint(0, 5, (64, 1)),
        "numbers": RNG.normal(size=(64, 2)),
    }


def preprocessing_model():
    """Every Keras preprocessing layer inside the model."""
    vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=5)
    vectorize.adapt(WORDS)
    text = keras.Input((), dtype="string", name="text")
    colour = keras.Input((1,), dtype="string", name="colour")
    ids = keras.Input((1,), dtype="int64", name="ids")
    numbers = keras.Input((2,), name="numbers")
    embedded = keras.layers.Embedding(20, 3)(vectorize(text))
    features = [
        keras.layers.GlobalAveragePooling1D()(embedded),
        keras.layers.StringLookup(vocabulary=COLOURS, output_mode="one_hot")(colour),
        keras.layers.Hashing(4, output_mode="one_hot")(colour),
        keras.layers.IntegerLookup(vocabulary=[0, 1, 2, 3], output_mode="one_hot")(ids),
        keras.layers.Normalization(mean=[0.1, -0.2], variance=[1.5, 0.7])(numbers),
        keras.layers.Discretization([-0.5, 0.0, 0.5], output_mode="one_hot")(
            numbers[:, :1]
        ),
    ]
    features = [ops.cast(f, "float64") for f in features]
    outputs = keras.layers.Dense(1)(keras.layers.Concatenate()(features))
    model = keras.Model([text, colour, ids, numbers], outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


LABELS = (Y > 0).astype("float64")

# name -> (build, labels)
PATTERNS = {
    "compute_loss": (loss_override, Y),
    "custom_train_step": (custom_train_step, Y),
    "hand_written_step": (hand_written_step, Y),
    "every_metric": (every_metric, LABELS),
    "gan_without_call": (gan, None),
    "gan": (functools.partial(gan, CallableGAN), None),
}


def fit(build, strategy=None, batch_size: int = 16, x=X, y=Y):
    """Builds (seeded) in `strategy`'s scope and fits 1 epoch.

    Returns:
        (model, per-batch logs, history dict)
    """
    logs = BatchLogs()
    data = dict(x=x) if y is None else dict(x=x, y=y)
    model, history = train(
        build, dict(data, batch_size=batch_size, epochs=1, callbacks=[logs]), strategy
    )
    return model, logs.logs, history


def max_logs_diff(a: list[dict], b: list[dict]) -> float:
    """Largest difference between two runs' per-batch logs (the same metrics,
    whose names a second model in the process suffixes with `_1`)."""
    a, b = ([_unnumbered(logs) for logs in run] for run in (a, b))
    assert [u.keys() for u in a] == [v.keys() for v in b]
    return max(abs(u[k] - v[k]) for u, v in zip(a, b, strict=True) for k in u)


def log_values(logs: list[dict]) -> np.ndarray:
    """Per-batch logs as one array (batches x metrics, names sorted without
    the `_1` suffixes), for comparisons that take arrays."""
    return np.array([[v for _, v in sorted(_unnumbered(d).items())] for d in logs])


def _unnumbered(logs: dict) -> dict:
    return {re.sub(r"_\d+$", "", k): v for k, v in logs.items()}
