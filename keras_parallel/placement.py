"""Putting a layer on a device: its weights, its forward and its backward.

`tf.device` around a layer's call places the forward ops only: inside a
traced train step the gradient ops GradientTape creates carry no device, so
the placer runs the whole backward pass on the default device. `run_on`
therefore wraps a call in `tf.custom_gradient` whose gradient function
differentiates the layer under the same `tf.device`.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from keras_parallel._tf_internal import (
    keras_logits,
    replace_storage,
    set_keras_logits,
    variable_on,
)


def variable_bytes(variable) -> int:
    """Bytes of a `tf.Variable`'s value."""
    return variable.shape.num_elements() * variable.dtype.size


def stage_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers a model is partitioned into, in the order they were built
    (for Sequential and Functional models, the order they run)."""
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def move_variable(variable: keras.Variable, device: str) -> None:
    """Moves a Keras variable's storage to `device`, keeping its value.

    The Keras variable object stays the same, so the layer, the optimizer
    and any checkpoint keep referring to it.
    """
    current = tf.DeviceSpec.from_string(variable.value.device)
    if current == tf.DeviceSpec.from_string(device):
        return
    replace_storage(variable, variable_on(variable, device))


class Taped:
    """How `run_on`'s backward gets what it reads: the forward runs under a
    tape of its own, which keeps every tensor its gradient needs until the
    backward has run (one per call)."""

    def forward(self, run, tensors: list):
        """Runs `run(tensors)` (the call, returning its flat targets) and
        returns the targets and `gradient(output_gradients, sources)`, the
        gradients of the targets with respect to `sources` (the call's
        tensors, then the variables it read)."""
        # Persistent: an outer persistent tape may ask for gradients twice.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(tensors)
            targets = run(tensors)

        def gradient(output_gradients, sources):
            return tape.gradient(
                targets,
                sources,
                output_gradients=output_gradients,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        return targets, gradient

    def placed(self, results: list) -> None:
        """Told the call's targets as the rest of the model sees them."""


def run_on(call, device: str, on_call=None, backward=None):
    """Wraps a layer's `call` so that its forward and backward run on `device`.

    Floating-point tensors among the arguments are differentiated; other
    arguments (masks, flags, indices) are passed through.

    Args:
        call: The function to wrap.
        device: Where its forward and backward ops go.
        on_call: Called with no arguments each time the wrapper runs.
        backward: Called with no arguments for each call, gives what keeps
            the tensors its backward reads (`Taped()` when None;
            `PipelineParallel` may recompute them instead,
            `pipeline/recompute.py`).
    """

    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        if on_call is not None:
            on_call()
        flat = tf.nest.flatten((args, kwargs))
        # One input per distinct tensor: a tensor passed twice (self-attention's
        # query and value) must get its gradient once, not once per argument.
        inputs, slot = [], {}
        for x in flat:
            if isinstance(x, tf.Tensor) and x.dtype.is_floating and id(x) not in slot:
                slot[id(x)] = len(inputs)
                inputs.append(x)

        structure = []  # the outputs' nest, and which carry Keras' logits

        def run(tensors):
            values = [tensors[slot[id(x)]] if id(x) in slot else x for x in flat]
            inner_args, inner_kwargs = tf.nest.pack_sequence_as((args, kwargs), values)
            outputs = call(*inner_args, **inner_kwargs)
            flat_outputs = tf.nest.flatten(outputs)
            logits = _keras_logits(flat_outputs)
            if not structure:
                structure.extend([outputs, list(logits)])
            return flat_outputs + list(logits.values())

        keeper = Taped() if backward is None else backward()

        @tf.custom_gradient
        def forward(*tensors):
            targets, differentiate = keeper.forward(run, list(tensors))

            def gradient(*output_gradients, variables=None):
                sources = list(tensors) + list(variables or [])
                with tf.device(device):
                    grads = differentiate(list(output_gradients), sources)
                if variables is None:
                    return grads
                return grads[: len(tensors)], grads[len(tensors) :]

            return targets, gradient

        with tf.device(device):
            results = forward(*inputs)
        keeper.placed(list(results))
        outputs, with_logits = structure
        flat_outputs = results[: len(results) - len(with_logits)]
        for index, logits in zip(
            with_logits, results[len(flat_outputs) :], strict=True
        ):
            set_keras_logits(flat_outputs[index], logits)
        return tf.nest.pack_sequence_as(outputs, flat_outputs)

    return wrapped


def _keras_logits(flat_outputs) -> dict[int, tf.Tensor]:
    """Output index -> the logits Keras' softmax and sigmoid attach to their
    output, from which Keras' cross-entropies start; they leave the wrapper
    beside the outputs so the loss sees what it sees on one device."""
    found = {i: keras_logits(x) for i, x in enumerate(flat_outputs)}
    return {i: logits for i, logits in found.items() if logits is not None}


def places_itself(layer: keras.layers.Layer) -> bool:
    """Whether a layer places its own weights and calls (`OnDevice`, the
    tensor-parallel layers), so that a strategy leaves it alone."""
    return getattr(layer, "places_itself", False)


def move_layer(layer: keras.layers.Layer, device: str) -> None:
    """Moves `layer`'s variables to `device`, unless it places itself."""
    if places_itself(layer):
        return
    for variable in layer.variables:
        move_variable(variable, device)
