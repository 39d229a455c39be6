"""Column- and row-parallel Dense layers (Megatron-LM, Shoeybi et al., 2019).

A Dense kernel of shape (inputs, units) is cut across devices either by its
columns (each device computes some output features) or by its rows (each
device multiplies some input features, and the partial results are summed).
A `ColumnParallelDense(gather_output=False)` followed by a
`RowParallelDense(input_is_parallel=True)` keeps the intermediate features
split, so the pair needs a single reduction: the sum of the row-parallel
partial results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_parallel._validation import check_int
from keras_parallel.layers import sharding
from keras_parallel.placement import move_variable, run_on
from keras_parallel.tensor_parallel.collectives import sum_on
from keras_parallel.tensor_parallel.shards import Sharding


class _ShardedDense(sharding.SavesWholeWeights, keras.layers.Layer):
    """What both layers share: arguments, config, conversion and saving of
    the whole weights (so a model saved on N devices loads on any number)."""

    places_itself = True
    split_axis: int  # of the kernel

    def __init__(
        self,
        units: int,
        devices: str | Sequence[str] | None = None,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_int("units", units, 1)
        self._devices_argument = devices
        self.devices = sharding.shard_devices(devices)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._shard_calls = [
            run_on(functools.partial(self._shard_call, i), device)
            for i, device in enumerate(self.devices)
        ]

    @classmethod
    def from_layer(
        cls,
        layer: keras.layers.Dense,
        devices: str | Sequence[str] | None = None,
        **kwargs,
    ):
        """A sharded copy of a built `keras.layers.Dense`, same weights.

        Args:
            layer: The Dense layer.
            devices: As for the constructor.
            **kwargs: Other constructor arguments (`gather_output`, ...).
        """
        if not isinstance(layer, keras.layers.Dense) or not layer.built:
            raise TypeError(
                f"`from_layer` takes a built keras.layers.Dense. Received: {layer!r}"
            )
        config = layer.get_config()
        sharded = cls(
            units=layer.units,
            devices=devices,
            activation=config["activation"],
            use_bias=layer.use_bias,
            kernel_initializer=config["kernel_initializer"],
            bias_initializer=config["bias_initializer"],
            **kwargs,
        )
        sharded.build(sharded._input_shape_for(layer.kernel.shape[0]))
        sharded.set_full_weights(layer.get_weights())
        return sharded

    def to_layer(self) -> keras.layers.Dense:
        """The equivalent plain `keras.layers.Dense`, same weights."""
        dense = keras.layers.Dense(
            self.units,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
        )
        weights = self.full_weights()
        dense.build((None, weights[0].shape[0]))
        dense.set_weights(weights)
        return dense

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "devices": self._devices_argument,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


@keras.saving.register_keras_serializable(package="keras_parallel")
class ColumnParallelDense(_ShardedDense):
    """A Dense layer whose output features are split across devices.

    Device i holds columns `[i*units/N, (i+1)*units/N)` of the kernel and of
    the bias (and so their optimizer slots), and computes those output
    features, forward and backward, on its device.

    Args:
        units: Output features, a multiple of the number of devices.
        devices: Devices to shard over; default: those of the enclosing
            `PipelineParallel` strategy, else all local devices.
        gather_output: If True, the outputs are concatenated into one tensor;
            if False, the layer returns the list of per-device shards of its
            output, for a `RowParallelDense(input_is_parallel=True)`. (A
            Functional model records each shard, so it loads on as many
            devices as it was
            saved with; a Sequential model loads on any number.)
        **kwargs: `activation`, `use_bias`, `kernel_initializer` and
            `bias_initializer` as for `keras.layers.Dense` (the activation
            is applied per shard), and a layer's `name` and `dtype`.

    Example:

    ```python
    x = keras_parallel.layers.ColumnParallelDense(4096, activation="gelu",
                                                  gather_output=False)(x)
    x = keras_parallel.layers.RowParallelDense(1024, input_is_parallel=True)(x)
    ```
    """

    split_axis = 1

    def __init__(
        self,
        units: int,
        devices: str | Sequence[str] | None = None,
        gather_output: bool = True,
        **kwargs: Any,
    ):
        super().__init__(units, devices, **kwargs)
        self.gather_output = gather_output
        self.shard_units = sharding.even_split(units, len(self.devices), "units")

    def _input_shape_for(self, input_dim):
        return (None, input_dim)

    def build(self, input_shape):
        self.kernels = sharding.add_shards(
            self,
            "kernel",
            (input_shape[-1], self.units),
            self.split_axis,
            self.devices,
            self.kernel_initializer,
        )
        self.biases = (
            sharding.add_shards(
                self, "bias", (self.units,), 0, self.devices, self.bias_initializer
            )
            if self.use_bias
            else []
        )

    def _weight_shards(self):
        bias = [(self.biases, 0)] if self.use_bias else []
        return [(self.kernels, self.split_axis), *bias]

    def _shard_call(self, i, inputs):
        outputs = keras.ops.matmul(inputs, self.kernels[i])
        if self.use_bias:
            outputs = outputs + self.biases[i]
        return self.activation(outputs)

    def call(self, inputs):
        shards = [shard_call(inputs) for shard_call in self._shard_calls]
        return Sharding(-1, len(shards)).join(shards) if self.gather_output else shards

    def compute_output_shape(self, input_shape):
        if self.gather_output:
            return (*input_shape[:-1], self.units)
        return [(*input_shape[:-1], self.shard_units)] * len(self.devices)

    def get_config(self) -> dict:
        return {**super().get_config(), "gather_output": self.gather_output}


@keras.saving.register_keras_serializable(package="keras_parallel")
class RowParallelDense(_ShardedDense):
    """A Dense layer whose input features are split across devices.

    Device i holds rows `[i*inputs/N, (i+1)*inputs/N)` of the kernel and
    multiplies its share of the input features; the partial results are
    summed (the layer's one reduction) on the first device, where the bias
    lives and the activation is applied.

    Args:
        units: Output features.
        devices: As for `ColumnParallelDense`.
        input_is_parallel: If True, the input is the list of per-device
            shards a `ColumnParallelDense(gather_output=False)` returns; if
            False, one tensor whose features are a multiple of the number of
            devices, split here.
        **kwargs: `activation`, `use_bias`, `kernel_initializer` and
            `bias_initializer` as for `keras.layers.Dense`, and a layer's
            `name` and `dtype`.
    """

    split_axis = 0

    def __init__(
        self,
        units: int,
        devices: str | Sequence[str] | None = None,
        input_is_parallel: bool = False,
        **kwargs: Any,
    ):
        super().__init__(units, devices, **kwargs)
        self.input_is_parallel = input_is_parallel

    def _input_shape_for(self, input_dim):
        if self.input_is_parallel:
            share = sharding.even_split(input_dim, len(self.devices), "input features")
            return [(None, share)] * len(self.devices)
        return (None, input_dim)

    def build(self, input_shape):
        if self.input_is_parallel:
            # Any number of shards: a saved model's build config records the
            # shards of the device count it was saved with.
            input_dim = sum(shape[-1] for shape in input_shape)
        else:
            input_dim = input_shape[-1]
        sharding.even_split(input_dim, len(self.devices), "input features")
        self.kernels = sharding.add_shards(
            self,
            "kernel",
            (input_dim, self.units),
            self.split_axis,
            self.devices,
            self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            with tf.device(self.devices[0]):
                self.bias = self.add_weight(
                    shape=(self.units,), initializer=self.bias_initializer, name="bias"
                )
            move_variable(self.bias, self.devices[0])

    def _weight_shards(self):
        bias = [([self.bias], 0)] if self.use_bias else []
        return [(self.kernels, self.split_axis), *bias]

    def _shard_call(self, i, inputs):
        return keras.ops.matmul(inputs, self.kernels[i])

    def call(self, inputs):
        if self.input_is_parallel:
            shards = list(inputs)
            if len(shards) != len(self.devices):
                raise ValueError(
                    "RowParallelDense(input_is_parallel=True) over "
                    f"{len(self.devices)} devices needs a list of "
                    f"{len(self.devices)} shards; received {len(shards)}. Feed "
                    "it the output of a ColumnParallelDense(gather_output=False) "
                    "on the same devices."
                )
        else:
            shards = Sharding(-1, len(self.devices)).cut(inputs)
        partials = [
            shard_call(shard)
            for shard_call, shard in zip(self._shard_calls, shards, strict=True)
        ]
        outputs = sum_on(partials, self.devices[0])
        with tf.device(self.devices[0]):
            if self.use_bias:
                outputs = outputs + self.bias
            return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        shape = input_shape[0] if self.input_is_parallel else input_shape
        return (*shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "input_is_parallel": self.input_is_parallel}
