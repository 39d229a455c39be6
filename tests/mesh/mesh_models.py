"""Models, layout maps and data of the MeshParallel tests, written as the
Keras distribution guide writes them."""

from __future__ import annotations

import keras
import numpy as np

VOCAB, STEPS, WIDTH = 32, 6, 16


def mesh(shape, axis_names=("batch", "model")) -> keras.distribution.DeviceMesh:
    n = int(np.prod(shape))
    return keras.distribution.DeviceMesh(
        shape=shape, axis_names=axis_names, devices=[f"cpu:{i}" for i in range(n)]
    )


def mlp() -> keras.Model:
    """A replicated layer, a column -> row pair, a replicated head."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(12, activation="tanh", name="stem")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="up")(x)
    x = keras.layers.Dense(16, name="down")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def mlp_layouts(device_mesh) -> keras.distribution.LayoutMap:
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["up/kernel"] = (None, "model")
    layout_map["down/kernel"] = ("model", None)
    return layout_map


def mlp_data(n: int = 64):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, 8)).astype("float32"),
        rng.normal(size=(n, 3)).astype("float32"),
    )


def transformer_block() -> keras.Model:
    """Embedding, self-attention, FFN and LayerNormalization, post-norm."""
    ids = keras.Input((STEPS,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, WIDTH, name="embed")(ids)
    a = keras.layers.MultiHeadAttention(4, 4, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(x + a)
    h = keras.layers.Dense(32, activation="relu", name="ffn_up")(x)
    h = keras.layers.Dense(WIDTH, name="ffn_down")(h)
    x = keras.layers.LayerNormalization(name="ln2")(x + h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(ids, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def transformer_layouts(device_mesh, embedding=("model", None)):
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["embed/embeddings"] = embedding
    layout_map["mha/(query|key|value)/kernel"] = (None, "model", None)
    layout_map["mha/attention_output/kernel"] = ("model", None, None)
    layout_map["ffn_up/kernel"] = (None, "model")
    layout_map["ffn_down/kernel"] = ("model", None)
    return layout_map


def transformer_data(n: int = 64):
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, VOCAB, size=(n, STEPS)).astype("int32"),
        rng.integers(0, 3, size=(n,)),
    )
