"""What a split layer computes on one device's shards, in either form of
tensor parallelism (`keras_parallel.layers`, MeshParallel's layer calls).

A vocabulary-split embedding looks up the ids its rows hold, zeros for the
others, so that the sum over the shards is the whole table's lookup. A
MultiHeadAttention splits by heads (Megatron-LM): each device runs Keras'
own attention on its heads' projections and the rows of the output
projection that read them, a partial sum of the output; the heads' scores
are joined along their heads axis.
"""

from __future__ import annotations

import tensorflow as tf

# Attention scores are (batch, heads, target, source).
SCORES_HEADS_AXIS = 1


def vocabulary_rows(table: tf.Tensor, ids: tf.Tensor, shard_index) -> tf.Tensor:
    """The rows of `ids` that vocabulary shard `shard_index` holds, zeros for
    the other ids.

    Args:
        table: The shard: rows `[shard_index * rows, (shard_index + 1) *
            rows)` of the whole table.
        ids: Integer ids into the whole table.
        shard_index: Which shard `table` is (an int or a scalar tensor).

    Returns:
        One vector per id, of shape `ids.shape + table.shape[1:]`.
    """
    rows = tf.shape(table, out_type=ids.dtype)[0]
    local = ids - tf.cast(shard_index, ids.dtype) * rows
    held = (local >= 0) & (local < rows)
    found = tf.gather(table, tf.where(held, local, tf.zeros_like(local)))
    return found * tf.cast(held, found.dtype)[..., None]
