"""Keras layers for placing models on devices."""

from keras_parallel.layers.on_device import OnDevice

__all__ = ["OnDevice"]
