"""XLA inside each device's part of a step.

Keras' TensorFlow trainer compiles, with `model.compile(jit_compile=True)`,
the function that calls `strategy.run` (`_make_function` in
keras/src/backend/tensorflow/trainer.py): the whole step, every replica
included, becomes one XLA program for one device, which cannot read the
variables of the others; with `"auto"` Keras turns XLA off under any
tf.distribute strategy. So the strategies compile the step themselves, as
TensorFlow's auto-clustering does: once a step's graph is traced, every op
that computes on one device (its inputs made on that device) is marked for
XLA with the attributes `tf.xla.experimental.jit_scope` sets, and
TensorFlow's clustering pass compiles each device's marked ops into clusters
on that device. What moves data between devices (the gradient reduction,
weight gathers, a pipeline's transfers), collectives and functional control
flow stay outside, so each device's forward and backward (and its part of
the optimizer update) runs compiled, and the reduction runs between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import keras
import tensorflow as tf

from keras_parallel._tf_internal import in_xla_context, mark_op, supports_xla

# Ops left to TensorFlow's executor: functional control flow whose bodies may
# span devices, function arguments, and cross-device communication.
_NOT_COMPILED = frozenset(
    {
        "If",
        "StatelessIf",
        "While",
        "StatelessWhile",
        "Case",
        "StatelessCase",
        "PartitionedCall",
        "StatefulPartitionedCall",
        "Placeholder",
        "NoOp",
    }
)
_NOT_COMPILED_PREFIXES = ("Collective", "Nccl", "_Send", "_Recv")


def check_jit_compile(value) -> bool | str:
    """Returns a strategy's `jit_compile` argument if it is True, False or
    "auto"; raises a ValueError naming what it received otherwise."""
    if value is True or value is False or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(
        f"`jit_compile` must be True, False or 'auto'. Received: jit_compile={value!r}"
    )
    return value


def refuse_whole_step_xla(strategy: str) -> None:
    """Raises a ValueError naming the fix when the step is being traced
    inside an XLA-compiled function (`model.compile(jit_compile=True)`)."""
    if in_xla_context():
        raise ValueError(
            f"{strategy} cannot run inside an XLA-compiled function. With "
            "`model.compile(..., jit_compile=True)` Keras compiles the function "
            "that runs the whole step into one XLA program for one device, "
            "which cannot reach the weights on the other devices. Leave "
            "`jit_compile` out of `model.compile` (or pass False) and give it "
            f"to the strategy: `{strategy}(..., jit_compile=True)` compiles "
            "each device's part of the step on that device, with the transfers "
            "between devices outside (its default, 'auto', does so on GPUs)."
        )


def compiles(jit_compile: bool | str, devices: Iterable[str], models) -> bool:
    """Whether a step on `devices` of `models` runs XLA-compiled: as Keras
    decides `jit_compile="auto"` on one device (on GPUs, for models whose
    layers all support XLA), or as the strategy's argument says."""
    if jit_compile != "auto":
        return jit_compile
    on_gpus = all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)
    return on_gpus and all(
        supports_xla(m) for m in models if isinstance(m, keras.Model)
    )


@contextlib.contextmanager
def compiled_per_device(enabled: bool, *, transfers: bool) -> Iterator[None]:
    """While open, the ops added to the default graph are recorded; when it
    closes, those that compute on one device are marked for XLA, one
    clustering scope per device. Nothing happens when `enabled` is False.

    Args:
        enabled: Whether to mark.
        transfers: Whether an op that reads tensors made on other devices
            is marked too: True for a pipeline, whose stages pass activations
            and gradients on; False for data parallelism, where such ops
            reduce or gather across replicas, and a cluster holding one would
            hold back its device's whole backward until the others finish.
    """
    if not enabled:
        yield
        return
    graph = tf.compat.v1.get_default_graph()
    first = len(graph.get_operations())
    yield
    for op in graph.get_operations()[first:]:
        device = _compiled_device(op, transfers)
        if device is not None:
            mark_op(op, "_XlaCompile", True)
            mark_op(op, "_XlaSeparateCompiledGradients", False)
            mark_op(op, "_XlaScope", f"keras_parallel/{device}")


def _compiled_device(op: tf.Operation, transfers: bool) -> str | None:
    """The device `op` computes on if XLA may compile it there, else None."""
    if not op.device or op.type in _NOT_COMPILED:
        return None
    if op.type.startswith(_NOT_COMPILED_PREFIXES):
        return None
    device = _device_key(op.device)
    if transfers:
        return device
    for tensor in op.inputs:
        producer = tensor.op
        # Arguments and captures (variables' handles among them) and ops left
        # to the placer do not say where the data was made.
        if producer.type == "Placeholder" or not producer.device:
            continue
        if _device_key(producer.device) != device:
            return None
    return device


def _device_key(name: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    return f"/job:{spec.job}/task:{spec.task}/{spec.device_type}:{spec.device_index}"
