"""`OnDevice`: one layer pinned to one device."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_parallel.devices import resolve_devices
from keras_parallel.placement import move_variable, run_on


@keras.saving.register_keras_serializable(package="keras_parallel")
class OnDevice(keras.layers.Layer):
    """Runs a layer on one device: its weights, forward and backward ops.

    Inside `PipelineParallel` the layer keeps this device whatever the
    partition, and its optimizer slots live there too. Outside a strategy
    the weights, forward and backward are placed; Keras then creates
    optimizer slots on the default device.

    Args:
        layer: The layer to place.
        device: A device name such as `"GPU:1"` or `"/device:CPU:0"`.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((784,)),
        keras_parallel.layers.OnDevice(keras.layers.Dense(4096), "GPU:0"),
        keras_parallel.layers.OnDevice(keras.layers.Dense(10), "GPU:1"),
    ])
    ```
    """

    def __init__(self, layer: keras.layers.Layer, device: str, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "`layer` must be a keras.layers.Layer. Received: "
                f"layer={layer!r} of type {type(layer).__name__}"
            )
        self.layer = layer
        self.device = device
        self.pinned_device = resolve_devices([device])[0]
        self._placed_call = run_on(self._call_layer, self.pinned_device)

    def _call_layer(self, *args, **kwargs):
        return self.layer(*args, **kwargs)

    places_itself = True

    def build(self, input_shape):
        # Keras builds layers outside any traced function, so the variables
        # are created here under the device (inside a traced call,
        # tf.init_scope would drop it).
        if not self.layer.built:
            with tf.device(self.pinned_device):
                self.layer(keras.KerasTensor(input_shape))
        # A strategy's variable creator may have put them elsewhere.
        for variable in self.layer.variables:
            move_variable(variable, self.pinned_device)

    def call(self, inputs, *args, **kwargs):
        return self._placed_call(inputs, *args, **kwargs)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "device": self.device,
        }

    @classmethod
    def from_config(cls, config: dict) -> OnDevice:
        config = dict(config)
        # Deserialising builds the layer: under the device, its weights go there.
        with tf.device(resolve_devices([config["device"]])[0]):
            layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        return cls(layer, **config)
