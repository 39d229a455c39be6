"""`ParallelEmbedding`: an embedding table split by vocabulary rows."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_parallel.layers import sharding
from keras_parallel.placement import run_on
from keras_parallel.tensor_parallel.collectives import sum_on
from keras_parallel.tensor_parallel.shard_compute import vocabulary_rows


@keras.saving.register_keras_serializable(package="keras_parallel")
class ParallelEmbedding(sharding.SavesWholeWeights, keras.layers.Layer):
    """An Embedding whose vocabulary is split across devices.

    Device i holds rows `[i*V/N, (i+1)*V/N)` of the table (and their
    optimizer slots) and looks up the ids that fall in its range, giving
    zeros for the others; the partial results are summed on the first device
    (the layer's one reduction). Outputs and gradients equal
    `keras.layers.Embedding` with the same table.

    Args:
        input_dim: Vocabulary size, a multiple of the number of devices.
        output_dim: Embedding size.
        devices: Devices to shard over; default: those of the enclosing
            `PipelineParallel` strategy, else all local devices.
        embeddings_initializer: As for `keras.layers.Embedding`.
        mask_zero: As for `keras.layers.Embedding`.

    Example:

    ```python
    tokens = keras.Input((128,), dtype="int32")
    x = keras_parallel.layers.ParallelEmbedding(50_000, 512)(tokens)
    ```
    """

    places_itself = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        devices: str | Sequence[str] | None = None,
        embeddings_initializer: str | keras.initializers.Initializer = "uniform",
        mask_zero: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self._devices_argument = devices
        self.devices = sharding.shard_devices(devices)
        sharding.even_split(input_dim, len(self.devices), "input_dim")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.mask_zero = mask_zero
        self._shard_calls = [
            run_on(functools.partial(self._shard_call, i), device)
            for i, device in enumerate(self.devices)
        ]

    def build(self, input_shape=None):
        self.tables = sharding.add_shards(
            self,
            "embeddings",
            (self.input_dim, self.output_dim),
            0,
            self.devices,
            self.embeddings_initializer,
        )

    def _shard_call(self, i, ids):
        return vocabulary_rows(self.tables[i], ids, i)

    def call(self, inputs):
        ids = tf.cast(inputs, "int32")
        partials = [shard_call(ids) for shard_call in self._shard_calls]
        return sum_on(partials, self.devices[0])

    def compute_mask(self, inputs, mask=None):
        return keras.ops.not_equal(inputs, 0) if self.mask_zero else None

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    @classmethod
    def from_layer(
        cls, layer: keras.layers.Embedding, devices: str | Sequence[str] | None = None
    ) -> ParallelEmbedding:
        """A sharded copy of a built `keras.layers.Embedding`, same table."""
        if not isinstance(layer, keras.layers.Embedding) or not layer.built:
            raise TypeError(
                "`from_layer` takes a built keras.layers.Embedding. "
                f"Received: {layer!r}"
            )
        sharded = cls(
            layer.input_dim,
            layer.output_dim,
            devices,
            embeddings_initializer=layer.embeddings_initializer,
            mask_zero=layer.mask_zero,
        )
        sharded.build()
        sharded.set_full_weights(layer.get_weights())
        return sharded

    def to_layer(self) -> keras.layers.Embedding:
        """The equivalent plain `keras.layers.Embedding`, same table."""
        layer = keras.layers.Embedding(
            self.input_dim,
            self.output_dim,
            embeddings_initializer=self.embeddings_initializer,
            mask_zero=self.mask_zero,
        )
        layer.build()
        layer.set_weights(self.full_weights())
        return layer

    def _weight_shards(self):
        return [(self.tables, 0)]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "devices": self._devices_argument,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "mask_zero": self.mask_zero,
        }
