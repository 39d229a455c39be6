"""Keras layers for placing models on devices and for tensor parallelism."""

from keras_parallel.layers.on_device import OnDevice
from keras_parallel.layers.parallel_attention import ParallelMultiHeadAttention
from keras_parallel.layers.parallel_dense import ColumnParallelDense, RowParallelDense
from keras_parallel.layers.parallel_embedding import ParallelEmbedding

__all__ = [
    "ColumnParallelDense",
    "OnDevice",
    "ParallelEmbedding",
    "ParallelMultiHeadAttention",
    "RowParallelDense",
]
