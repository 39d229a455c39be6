"""What tensor-parallel layers share: their devices, even splits, and a
weight's shards (cut as `keras_parallel.mesh.shards.Sharding` says) created
on their devices, one Keras variable per shard."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_parallel.devices import resolve_devices
from keras_parallel.placement import move_variable
from keras_parallel.tensor_parallel.shards import Sharding


def shard_devices(devices: str | Sequence[str] | None) -> tuple[str, ...]:
    """The devices a layer shards over: `devices`, else those of the
    enclosing `PipelineParallel` strategy, else all local devices."""
    if devices is not None:
        return resolve_devices(devices)
    stages = getattr(tf.distribute.get_strategy(), "stage_devices", None)
    return stages if stages is not None else resolve_devices(None)


def even_split(total: int, num_devices: int, argument: str) -> int:
    """`total // num_devices`, or a ValueError naming `argument`."""
    if total % num_devices:
        raise ValueError(
            f"`{argument}`={total} does not split evenly over {num_devices} "
            f"devices. Use a multiple of {num_devices}, or pass `devices` with "
            f"a number of devices that divides {total}."
        )
    return total // num_devices


def add_shards(
    layer: keras.layers.Layer,
    name: str,
    full_shape: Sequence[int],
    axis: int,
    devices: Sequence[str],
    initializer,
) -> list[keras.Variable]:
    """Creates a weight split along `axis`, one shard per device.

    The whole weight is initialised once and cut, so that its values follow
    the initializer's distribution for the full shape (Glorot's scale depends
    on it), as in the plain layer.
    """
    initializer = keras.initializers.get(initializer)
    full = initializer(tuple(full_shape), dtype=layer.variable_dtype)
    cut = Sharding(axis, len(devices)).cut(full)
    shards = []
    for i, (shard, device) in enumerate(zip(cut, devices, strict=True)):
        shard = np.asarray(shard)
        with tf.device(device):
            variable = layer.add_weight(
                shape=shard.shape,
                initializer=lambda shape, dtype=None, shard=shard: shard,
                name=f"{name}_{i}",
            )
        # A strategy's variable creator may have put it elsewhere.
        move_variable(variable, device)
        shards.append(variable)
    return shards


def assign_shards(shards: Sequence[keras.Variable], full, axis: int) -> None:
    """Sets shards from the whole weight's value."""
    cut = Sharding(axis, len(shards)).cut(np.asarray(full))
    for shard, value in zip(shards, cut, strict=True):
        shard.assign(value)


def gather(shards: Sequence[keras.Variable], axis: int) -> np.ndarray:
    """The whole weight's value."""
    values = [np.asarray(s) for s in shards]
    return np.asarray(Sharding(axis, len(shards)).join(values))


class SavesWholeWeights:
    """What a sharded layer shares with the plain Keras layer it splits: its
    weights whole, in that layer's `get_weights()` order (`full_weights`,
    `set_full_weights`), and saved so, so that a model saved on N devices
    loads on any number. Mixed into the tensor-parallel layers, before
    `Layer`; each lists its weights in `_weight_shards`."""

    def _weight_shards(self) -> list[tuple[list[keras.Variable], int]]:
        """(shards, axis) per weight of the plain layer, in its order; a
        weight held whole on one device is one shard."""
        raise NotImplementedError

    def full_weights(self) -> list[np.ndarray]:
        """The weights as the plain Keras layer holds them."""
        return [gather(shards, axis) for shards, axis in self._weight_shards()]

    def set_full_weights(self, weights: Sequence) -> None:
        """Sets the shards from the plain Keras layer's `get_weights()`."""
        for (shards, axis), value in zip(self._weight_shards(), weights, strict=True):
            assign_shards(shards, value, axis)

    def save_own_variables(self, store) -> None:
        for i, value in enumerate(self.full_weights()):
            store[str(i)] = value

    def load_own_variables(self, store) -> None:
        self.set_full_weights([store[str(i)] for i in range(len(store.keys()))])
