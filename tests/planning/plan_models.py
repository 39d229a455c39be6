"""The three models the plan is checked on, compiled with no strategy."""

import keras

BATCH = 16


def mlp():
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu", name="d1"),
            keras.layers.Dense(64, activation="relu", name="d2"),
            keras.layers.Dense(64, activation="relu", name="d3"),
            keras.layers.Dense(10, name="out"),
        ]
    )


def convnet():
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(8, 3, activation="relu", name="c1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Conv2D(8, 3, activation="relu", name="c2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(16, activation="relu", name="fc"),
            keras.layers.Dense(10, name="out"),
        ]
    )


def transformer_block():
    x = keras.Input((8, 16))
    a = keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x)
    h = keras.layers.LayerNormalization(name="ln1")(
        keras.layers.Add(name="add1")([x, a])
    )
    f = keras.layers.Dense(32, activation="relu", name="up")(h)
    f = keras.layers.Dense(16, name="down")(f)
    h = keras.layers.LayerNormalization(name="ln2")(
        keras.layers.Add(name="add2")([h, f])
    )
    p = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(10, name="out")(p))


MODELS = {"mlp": mlp, "convnet": convnet, "transformer_block": transformer_block}


def compiled(name: str, optimizer="adam"):
    model = MODELS[name]()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model
