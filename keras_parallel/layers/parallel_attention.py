"""`ParallelMultiHeadAttention`: attention heads split across devices."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import tensorflow as tf

# Keras' own mask bookkeeping, as keras.layers.MultiHeadAttention uses it.
from keras_parallel._tf_internal import get_keras_mask, set_keras_mask
from keras_parallel.layers import sharding
from keras_parallel.placement import move_variable, run_on
from keras_parallel.tensor_parallel.collectives import sum_on
from keras_parallel.tensor_parallel.shard_compute import SCORES_HEADS_AXIS
from keras_parallel.tensor_parallel.shards import Sharding

# Per head-sharded weight: (name, axis of the heads).
_HEAD_WEIGHTS = (
    ("query_kernel", 1),
    ("query_bias", 0),
    ("key_kernel", 1),
    ("key_bias", 0),
    ("value_kernel", 1),
    ("value_bias", 0),
    ("output_kernel", 0),
)


@keras.saving.register_keras_serializable(package="keras_parallel")
class ParallelMultiHeadAttention(sharding.SavesWholeWeights, keras.layers.Layer):
    """`keras.layers.MultiHeadAttention` with its heads split across devices.

    Device i holds the query, key and value projections of its heads and the
    rows of the output projection that read them, and computes Keras' own
    attention for those heads, forward and backward; the per-device outputs
    are summed on the first device (the layer's one reduction), where the
    output bias is.
    Inputs of shape (batch, length, features), attention over the length.

    Args:
        num_heads: Number of heads, a multiple of the number of devices.
        key_dim: As for `keras.layers.MultiHeadAttention`.
        value_dim: As for `keras.layers.MultiHeadAttention`.
        use_bias: As for `keras.layers.MultiHeadAttention`.
        output_shape: The output's last dimension, an integer (default: the
            query's).
        kernel_initializer: As for `keras.layers.MultiHeadAttention`.
        bias_initializer: As for `keras.layers.MultiHeadAttention`.
        dropout: Dropout on the attention probabilities.
        devices: Devices to shard over; default: those of the enclosing
            `PipelineParallel` strategy, else all local devices.

    The call takes `keras.layers.MultiHeadAttention`'s arguments: `query`,
    `value`, `key`, `attention_mask`, `return_attention_scores`, `training`,
    `use_causal_mask`, and the inputs' Keras masks.
    """

    places_itself = True

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: int | None = None,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        devices: str | Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim or key_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.output_features = output_shape
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._devices_argument = devices
        self.devices = sharding.shard_devices(devices)
        self.local_heads = sharding.even_split(
            num_heads, len(self.devices), "num_heads"
        )
        # Keras' attention of one device's heads (and the combined mask),
        # with no weights of its own: its projections are never built.
        self._attention = keras.layers.MultiHeadAttention(
            self.local_heads, key_dim, self.value_dim, dropout=dropout
        )
        self._attention._build_attention(rank=4)  # (batch, length, heads, dim)
        self._shard_calls = [
            run_on(functools.partial(self._shard_call, i), device)
            for i, device in enumerate(self.devices)
        ]

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = key_shape or value_shape
        out = self.output_features or query_shape[-1]
        shapes = {
            "query_kernel": (query_shape[-1], self.num_heads, self.key_dim),
            "query_bias": (self.num_heads, self.key_dim),
            "key_kernel": (key_shape[-1], self.num_heads, self.key_dim),
            "key_bias": (self.num_heads, self.key_dim),
            "value_kernel": (value_shape[-1], self.num_heads, self.value_dim),
            "value_bias": (self.num_heads, self.value_dim),
            "output_kernel": (self.num_heads, self.value_dim, out),
        }
        self.shards = {}
        for name, axis in _HEAD_WEIGHTS:
            if name.endswith("bias") and not self.use_bias:
                continue
            initializer = (
                self.bias_initializer
                if name.endswith("bias")
                else self.kernel_initializer
            )
            self.shards[name] = sharding.add_shards(
                self, name, shapes[name], axis, self.devices, initializer
            )
        self.output_bias = None
        if self.use_bias:
            with tf.device(self.devices[0]):
                self.output_bias = self.add_weight(
                    shape=(out,), initializer=self.bias_initializer, name="output_bias"
                )
            move_variable(self.output_bias, self.devices[0])

    def _project(self, i, inputs, name):
        projected = tf.einsum("abc,cde->abde", inputs, self.shards[f"{name}_kernel"][i])
        if self.use_bias:
            projected = projected + self.shards[f"{name}_bias"][i]
        return projected

    def _shard_call(self, i, query, key, value, mask, training, return_scores):
        attended, scores = self._attention._compute_attention(
            self._project(i, query, "query"),
            self._project(i, key, "key"),
            self._project(i, value, "value"),
            mask,
            training,
            return_scores,
        )
        output = tf.einsum("abcd,cde->abe", attended, self.shards["output_kernel"][i])
        return (output, scores) if return_scores else output

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        key = value if key is None else key
        query_mask = get_keras_mask(query)
        for tensor in (query, value, key):
            set_keras_mask(tensor, None)
        mask = self._attention._compute_attention_mask(
            query,
            value,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
        )
        results = [
            shard_call(query, key, value, mask, training, return_attention_scores)
            for shard_call in self._shard_calls
        ]
        outputs = [r[0] for r in results] if return_attention_scores else results
        output = sum_on(outputs, self.devices[0])
        if self.use_bias:
            with tf.device(self.devices[0]):
                output = output + self.output_bias
        if query_mask is not None:
            set_keras_mask(output, query_mask)
        if return_attention_scores:
            scores = [r[1] for r in results]
            return output, Sharding(SCORES_HEADS_AXIS, len(scores)).join(scores)
        return output

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        return (*query_shape[:-1], self.output_features or query_shape[-1])

    def _weight_shards(self):
        shards = [(self.shards[n], a) for n, a in _HEAD_WEIGHTS if n in self.shards]
        return shards + ([([self.output_bias], 0)] if self.use_bias else [])

    def _plain_config(self) -> dict:
        return dict(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            output_shape=self.output_features,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
        )

    @classmethod
    def from_layer(
        cls,
        layer: keras.layers.MultiHeadAttention,
        devices: str | Sequence[str] | None = None,
    ) -> ParallelMultiHeadAttention:
        """A head-sharded copy of a built `keras.layers.MultiHeadAttention`."""
        if not isinstance(layer, keras.layers.MultiHeadAttention) or not layer.built:
            raise TypeError(
                "`from_layer` takes a built keras.layers.MultiHeadAttention. "
                f"Received: {layer!r}"
            )
        output_shape = layer.get_config()["output_shape"]
        if isinstance(output_shape, (list, tuple)):
            output_shape = output_shape[-1]
        sharded = cls(
            num_heads=layer.num_heads,
            key_dim=layer.key_dim,
            value_dim=layer.value_dim,
            dropout=layer.dropout,
            use_bias=layer.use_bias,
            output_shape=output_shape,
            devices=devices,
        )
        sharded.build(
            (None, None, layer.query_dense.kernel.shape[0]),
            (None, None, layer.value_dense.kernel.shape[0]),
            (None, None, layer.key_dense.kernel.shape[0]),
        )
        sharded.set_full_weights(layer.get_weights())
        return sharded

    def to_layer(self) -> keras.layers.MultiHeadAttention:
        """The equivalent plain `keras.layers.MultiHeadAttention`."""
        layer = keras.layers.MultiHeadAttention(**self._plain_config())
        query_dim = self.shards["query_kernel"][0].shape[0]
        key_dim = self.shards["key_kernel"][0].shape[0]
        value_dim = self.shards["value_kernel"][0].shape[0]
        layer.build(
            (None, None, query_dim), (None, None, value_dim), (None, None, key_dim)
        )
        layer.set_weights(self.full_weights())
        return layer

    def get_config(self) -> dict:
        config = self._plain_config()
        config["kernel_initializer"] = keras.initializers.serialize(
            self.kernel_initializer
        )
        config["bias_initializer"] = keras.initializers.serialize(self.bias_initializer)
        return {**super().get_config(), **config, "devices": self._devices_argument}
