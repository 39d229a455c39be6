"""Gradient reduction algorithms, each a `tf.distribute.CrossDeviceOps`."""

from keras_parallel.reduction.local_sum import LocalSum

__all__ = ["LocalSum"]
