"""The calls of layers with split weights, while MeshParallel traces a step.

Each mixin goes before a Keras class (`specialize.py`) and computes what the
class's own `call` does, on the replica's shards, with the exchanges its
role (`plan.py`) needs. Outside a step the layers compute as Keras wrote them.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from keras_parallel._tf_internal import get_keras_mask, set_keras_mask
from keras_parallel.mesh.plan import Role
from keras_parallel.tensor_parallel.collectives import (
    enter_model_parallel,
    gather_shards,
    shard_index,
    split_shards,
    sum_partials,
)
from keras_parallel.tensor_parallel.shard_compute import (
    SCORES_HEADS_AXIS,
    vocabulary_rows,
)


def _role(layer) -> Role | None:
    return tf.distribute.get_strategy().extended.layer_role(layer)


def _linear(layer, role: Role, inputs, product):
    """A Dense or EinsumDense: `product(x)` with the kernel's shard, then
    bias and activation, with the exchanges of its role."""
    x = inputs
    if role.kind == "column" and role.enter:
        x = enter_model_parallel(x)
    if role.kind == "row" and role.split_input:
        x = split_shards(x, role.axis)
    y = product(x)
    if role.kind == "row":
        y = sum_partials(y)
    if layer.bias is not None:
        y = ops.add(y, layer.bias)
    if layer.activation is not None:
        y = layer.activation(y)
    if role.kind == "column" and role.gather_output:
        y = gather_shards(y, role.axis)
    return y


class _TakesShards:
    """A row layer fed by a column layer that kept its shards receives those
    shards, narrower than the layer's `input_spec` says; the call checks
    shapes itself."""

    @property
    def input_spec(self):
        role = _role(self)
        if role is not None and role.kind == "row" and not role.split_input:
            return None
        return keras.layers.Layer.input_spec.fget(self)

    @input_spec.setter
    def input_spec(self, value):
        keras.layers.Layer.input_spec.fset(self, value)


class SplitDense(_TakesShards):
    """`keras.layers.Dense.call` on a column or row shard of its kernel."""

    def call(self, inputs, training=None):
        role = _role(self)
        if role is None:
            return super().call(inputs, training=training)
        return _linear(self, role, inputs, lambda x: ops.matmul(x, self.kernel))


class SplitEinsumDense(_TakesShards):
    """`keras.layers.EinsumDense.call` on a shard of its kernel."""

    def call(self, inputs, training=None):
        role = _role(self)
        if role is None:
            return super().call(inputs, training=training)
        return _linear(
            self, role, inputs, lambda x: ops.einsum(self.equation, x, self.kernel)
        )


class SplitEmbedding:
    """`keras.layers.Embedding.call` on rows (vocabulary) or columns (width)
    of its table."""

    def call(self, inputs):
        role = _role(self)
        if role is None:
            return super().call(inputs)
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        # The replica's shard (the Keras variable's shape is the whole one's).
        table = tf.convert_to_tensor(self.embeddings)
        if role.kind == "width":
            outputs = gather_shards(ops.take(table, inputs, axis=0), -1)
        else:
            outputs = sum_partials(vocabulary_rows(table, inputs, shard_index()))
        return ops.cast(outputs, self.compute_dtype)


class SplitAttention:
    """`keras.layers.MultiHeadAttention.call` on the replica's heads: the
    inputs enter the model group once (Megatron's `f`), the projections keep
    their heads, and the output projection sums the heads' partials."""

    def call(self, query, value, key=None, **kwargs):
        if _role(self) is None:
            return super().call(query, value, key, **kwargs)
        entered: dict[int, object] = {}

        def enter(x):
            if x is None:
                return None
            if id(x) not in entered:
                y = enter_model_parallel(x)
                set_keras_mask(y, get_keras_mask(x))
                entered[id(x)] = y
            return entered[id(x)]

        outputs = super().call(enter(query), enter(value), enter(key), **kwargs)
        if kwargs.get("return_attention_scores"):
            output, scores = outputs
            return output, gather_shards(scores, SCORES_HEADS_AXIS)
        return outputs
