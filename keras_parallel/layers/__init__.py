"""Keras layers for placing models on devices and for tensor parallelism."""

from keras_parallel.layers.on_device import OnDevice
from keras_parallel.layers.parallel_dense import ColumnParallelDense, RowParallelDense

__all__ = ["ColumnParallelDense", "OnDevice", "RowParallelDense"]
