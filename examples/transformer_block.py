"""A transformer block built from keras_parallel's tensor-parallel layers,
trained with an unchanged `fit` under PipelineParallel on 4 logical devices.

Run:
    .venv/bin/python examples/transformer_block.py

Prints the training loss and the placement report: every sharded weight, and
its optimizer slots, is split evenly over the devices.
"""

from __future__ import annotations

import keras_parallel

VOCABULARY, LENGTH, WIDTH, HEADS, HIDDEN = 1024, 32, 128, 8, 512


def build_model():
    """Embedding, pre-norm causal self-attention and feed-forward, a
    classifier head; the big layers are sharded across the devices."""
    import keras

    layers = keras_parallel.layers
    tokens = keras.Input((LENGTH,), dtype="int32")
    x = layers.ParallelEmbedding(VOCABULARY, WIDTH)(tokens)
    h = keras.layers.LayerNormalization()(x)
    h = layers.ParallelMultiHeadAttention(HEADS, WIDTH // HEADS)(
        h, h, use_causal_mask=True
    )
    x = keras.layers.Add()([x, h])
    h = keras.layers.LayerNormalization()(x)
    h = layers.ColumnParallelDense(HIDDEN, activation="gelu", gather_output=False)(h)
    h = layers.RowParallelDense(WIDTH, input_is_parallel=True)(h)
    x = keras.layers.Add()([x, h])
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(x))
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(tokens, outputs)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    devices = keras_parallel.virtual_devices(4)
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.randint(1, VOCABULARY, (2048, LENGTH))
    y = (x[:, 0] < VOCABULARY // 2).astype("int32")  # depends on the first token

    strategy = keras_parallel.PipelineParallel(devices)
    with strategy.scope():
        model = build_model()
    model.fit(x, y, batch_size=64, epochs=2)
    print()
    print(keras_parallel.placement_report(model))


if __name__ == "__main__":
    main()
