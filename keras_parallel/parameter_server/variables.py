"""Variables that live on a ps task, one resource shared by every worker.

TensorFlow 2 makes every eager variable an anonymous resource, private to
the client that made it. A ps task's devices keep named resources in their
resource manager, though, and every client that asks for the same
`shared_name` on the same device gets a handle to the same resource
(`VarHandleOp`). So each worker makes the n-th variable of its script under
the name `keras_parallel/<n>/<name>`: the chief (worker 0) initialises it,
the others wait until it is initialised and use what the chief wrote. A
worker started again later finds the variables initialised and carries on
from their current values.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import BaseResourceVariable, give_handle_shape
from keras_parallel.parameter_server.lost_ps import reported_as_lost

POLL_SECONDS = 0.05
INIT_TIMEOUT_SECONDS = 600


class PSVariable(BaseResourceVariable):
    """A resource variable over a shared handle on a ps task.

    Reads and writes run on the ps device that holds it (resource ops run
    where their resource is). It never destroys its resource: other workers
    may still be using it. `found` says whether its value was there before
    this worker asked for it (written by another worker, or kept by a ps
    task that outlived an earlier run of this one).
    """

    found = False


def shared_variable(
    shared_name: str,
    device: str,
    initial_value,
    *,
    initialize: bool,
    name: str,
    dtype=None,
    shape=None,
    trainable: bool = True,
    synchronization=tf.VariableSynchronization.AUTO,
    aggregation=tf.VariableAggregation.NONE,
    distribute_strategy=None,
    timeout: float = INIT_TIMEOUT_SECONDS,
) -> PSVariable:
    """The variable `shared_name` on `device`, made or found.

    Args:
        shared_name: the resource's name, the same on every worker.
        device: the ps device holding it.
        initial_value: a tensor, or a callable returning one.
        initialize: True on the one worker that writes the initial value
            (unless it is there already: that worker was started again);
            the others wait (at most `timeout` seconds) until it is written.
        name, dtype, shape, trainable, synchronization, aggregation,
        distribute_strategy: as for `tf.Variable`.

    Returns:
        A `PSVariable`.
    """
    if callable(initial_value):
        initial_value = initial_value()
    value = tf.convert_to_tensor(initial_value, dtype=dtype)
    dtype = value.dtype
    shape = value.shape if shape is None else tf.TensorShape(shape)
    with tf.device(device):
        handle = tf.raw_ops.VarHandleOp(
            dtype=dtype, shape=shape, shared_name=shared_name, container=""
        )
        give_handle_shape(handle, shape, dtype)
        found = not initialize or _initialized(handle)
        if not found:
            tf.raw_ops.AssignVariableOp(resource=handle, value=value)
        else:
            _wait_initialized(handle, shared_name, timeout)
            there = tuple(tf.raw_ops.VariableShape(input=handle).numpy())
            if there != tuple(shape):
                raise ValueError(
                    f"Variable {shared_name!r} on {device} has shape {there} "
                    f"(written by worker 0), but this worker makes it with "
                    f"shape {tuple(shape)}. Every worker must build the same "
                    "model in the same order under ParameterServer.scope()."
                )
    variable = PSVariable(
        trainable=trainable,
        shape=shape,
        dtype=dtype,
        handle=handle,
        name=name,
        unique_id=shared_name,
        handle_name=name,
        synchronization=synchronization,
        aggregation=aggregation,
        distribute_strategy=distribute_strategy,
        in_graph_mode=False,
    )
    variable.found = found
    return variable


def _initialized(handle) -> bool:
    with reported_as_lost():
        return bool(tf.raw_ops.VarIsInitializedOp(resource=handle))


def _wait_initialized(handle, shared_name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _initialized(handle):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Worker 0 did not initialise variable {shared_name!r} within "
                f"{timeout:.0f} s. Is worker 0 running the same script?"
            )
        time.sleep(POLL_SECONDS)


class BytePlacer:
    """Puts each new variable on the ps device holding the fewest bytes."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = list(devices)
        self.bytes = [0] * len(devices)

    def place(self, shape, dtype) -> str:
        size = int(np.prod(shape, dtype=np.int64)) * tf.as_dtype(dtype).size
        return self.place_bytes(size)

    def place_bytes(self, size: int, avoid=()) -> str:
        """The device for `size` more bytes, not one of `avoid` (the devices
        holding a weight's other row ranges) while another is left."""
        indices = [i for i, d in enumerate(self.devices) if d not in avoid]
        index = min(indices or range(len(self.devices)), key=self.bytes.__getitem__)
        self.bytes[index] += size
        return self.devices[index]
