"""Models and data the transparency tests train on one device and in
parallel: an MLP, a convnet with BatchNormalization, an Embedding+LSTM, a
weighted and regularized model, and a bfloat16 one."""

import keras
import numpy as np

RNG = np.random.RandomState(42)


def mlp_sgd_momentum():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


MLP_DATA = dict(
    x=RNG.rand(256, 16).astype("float32"),
    y=RNG.randint(0, 10, 256),
    batch_size=64,
)


def conv_batchnorm_adam():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            # No bias: BatchNormalization cancels it, its true gradient is 0
            # and Adam would turn rounding noise into full-size steps.
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


CONV_DATA = dict(
    x=RNG.rand(128, 8, 8, 3).astype("float32"),
    y=RNG.randint(0, 3, 128),
    batch_size=32,
)


def embedding_lstm_adamw():
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(50, 8),
            keras.layers.LSTM(8),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


LSTM_DATA = dict(
    x=RNG.randint(0, 50, (128, 6)).astype("int32"),
    y=RNG.randint(0, 2, 128),
    batch_size=32,
)


def weighted_regularized():
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(
        16,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(1e-2),
        activity_regularizer=keras.regularizers.L1(1e-3),
    )(inputs)
    outputs = keras.layers.Dense(1, bias_regularizer=keras.regularizers.L2(1e-2))(
        hidden
    )
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-2),
        loss="mse",
        metrics=["mae"],
        weighted_metrics=["mse"],
    )
    return model


WEIGHTED_DATA = dict(
    x=RNG.rand(192, 12).astype("float32"),
    y=RNG.rand(192, 1).astype("float32"),
    sample_weight=RNG.rand(192).astype("float32") * 2,
    batch_size=48,
)


def bf16_loss_scale():
    return mixed_precision_mlp("mixed_bfloat16")


def fp16_loss_scale():
    return mixed_precision_mlp("mixed_float16")


def mixed_precision_mlp(policy: str):
    """The MLP under Keras' global dtype `policy` (set here; the caller
    restores float32), with loss scaling."""
    keras.mixed_precision.set_global_policy(policy)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, dtype="float32"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# (build, data, tolerance on weights and histories)
CASES = {
    "mlp_sgd_momentum": (mlp_sgd_momentum, MLP_DATA, 1e-5),
    "conv_batchnorm_adam": (conv_batchnorm_adam, CONV_DATA, 1e-5),
    "embedding_lstm_adamw": (embedding_lstm_adamw, LSTM_DATA, 1e-5),
    "weighted_regularized": (weighted_regularized, WEIGHTED_DATA, 1e-5),
    # bfloat16 keeps 8 bits of mantissa: a matmul over half the batch rounds
    # differently from one over the whole batch, by up to ~2^-8 relative per
    # product. Weights stay float32; after one epoch they agree to 1e-2.
    "bf16_loss_scale": (bf16_loss_scale, MLP_DATA, 1e-2),
}
