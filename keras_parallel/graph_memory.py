"""What a traced training step holds for its backward, read from its graph.

Between a forward op and the backward op that reads its output, the tensor
is alive: these are the activations a step holds, the memory pipelining,
recomputation and `keras.RematScope` are about. A traced step shows them
exactly: the tensors made outside any gradient computation that ops inside
one (`gradient_tape/...`, or a recomputation for one: `recompute/...`)
read. Identity ops (`tf.custom_gradient`'s
`IdentityN`, TensorFlow's own) pass a buffer through without copying, so a
tensor counts as the one it passes through; a tensor read on another device
is copied there, so it counts on the device of the op that reads it.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import tensorflow as tf

from keras_parallel._tf_internal import graph_functions
from keras_parallel.devices import short_device

# Gradient ops, and the forward ops PipelineParallel recomputes for them.
_BACKWARD = re.compile(r"(^|/)(gradient_tape|gradients(_\d+)?|recompute(_\d+)?)/")
_MICROBATCH = re.compile(r"(?:^|/)microbatch_(\d+)/")
_NOT_ACTIVATIONS = {"ReadVariableOp", "Const", "VarHandleOp", "Shape", "ShapeN"}
_ALIASES = {"Identity", "IdentityN", "StopGradient"}


@dataclasses.dataclass(frozen=True)
class HeldTensor:
    """A forward tensor the backward reads.

    Attributes:
        name: The tensor's name in its graph (after identities).
        device: Where it is read (the reading backward op's device, short
            form such as `"CPU:1"`; `""` when the graph gives none).
        microbatch: The micro-batch it belongs to (PipelineParallel names
            them `microbatch_<i>`), or None.
        bytes: Its size.
    """

    name: str
    device: str
    microbatch: int | None
    bytes: int


def held_tensors(graph: tf.Graph) -> list[HeldTensor]:
    """The forward tensors of `graph` (and the functions it calls) that its
    backward reads; one entry per tensor and reading device.

    Raises:
        ValueError: a held tensor's shape is not known while tracing (trace
            with fixed shapes: `traced_train_step`).
    """
    found: dict[tuple[int, str], HeldTensor] = {}
    for source, op in held_reads(graph):
        device = short_device(op.device)
        match = _MICROBATCH.search(source.op.name)
        found[id(source), device] = HeldTensor(
            name=source.name,
            device=device,
            microbatch=None if match is None else int(match.group(1)),
            bytes=source.shape.num_elements() * source.dtype.size,
        )
    return list(found.values())


def held_reads(graph: tf.Graph):
    """Each read of a held tensor: `(tensor, op)` for every backward op of
    `graph` (and the functions it calls) reading a forward tensor (after
    identities), one pair per input read.

    Raises:
        ValueError: a held tensor's shape is not known while tracing.
    """
    for g in _graphs(graph):
        for op in g.get_operations():
            if not _BACKWARD.search(op.name):
                continue
            for tensor in op.inputs:
                source = _source(tensor)
                if _BACKWARD.search(source.op.name) or not _activation(source):
                    continue
                if not source.shape.is_fully_defined():
                    raise ValueError(
                        f"The held tensor {source.name} has the shape "
                        f"{source.shape}, not known while tracing; trace the "
                        "step with inputs of fixed shape."
                    )
                yield source, op


def forward_reads(graph: tf.Graph):
    """Each read of a forward tensor by a forward op: `(tensor, op)` for the
    ops of `graph` (and the functions it calls) outside any gradient
    computation, the tensor taken after identities; variables, constants
    and shapes are left out."""
    for g in _graphs(graph):
        for op in g.get_operations():
            if _BACKWARD.search(op.name) or op.type in _ALIASES:
                continue
            for tensor in op.inputs:
                source = _source(tensor)
                if _activation(source) and source.shape.is_fully_defined():
                    yield source, op


def held_bytes(graph: tf.Graph, by_microbatch: bool = False) -> dict:
    """Bytes of `held_tensors(graph)` per reading device, or per (device,
    micro-batch) with `by_microbatch`."""
    total: collections.Counter = collections.Counter()
    for held in held_tensors(graph):
        key = (held.device, held.microbatch) if by_microbatch else held.device
        total[key] += held.bytes
    return dict(total)


def traced_train_step(model, x, y) -> tf.Graph:
    """The graph of one `model.train_step` on inputs shaped like `x` and `y`
    (arrays or nests of arrays), run as `fit` runs it: in the model's
    strategy, `strategy.run`. Traces only; nothing is updated.

    Returns:
        The traced `tf.Graph`.
    """
    return train_step_function(model, x, y).graph


def train_step_function(model, x, y):
    """One `model.train_step` on inputs of the shapes and dtypes of `x` and
    `y`, as `traced_train_step` traces it, as a concrete function: calling
    it with such tensors trains one step, running the ops of its `graph`.

    Returns:
        The `tf.types.experimental.ConcreteFunction`.
    """
    strategy = model.distribute_strategy
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        return strategy.run(model.train_step, args=((x, y),))

    specs = tf.nest.map_structure(
        lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), (x, y)
    )
    return step.get_concrete_function(*specs)


def _graphs(graph):
    yield graph
    for inner in graph_functions(graph):
        yield from _graphs(inner)


def _source(tensor):
    while tensor.op.type in _ALIASES:
        tensor = tensor.op.inputs[tensor.value_index]
    return tensor


def _activation(tensor) -> bool:
    return (
        tensor.dtype != tf.resource
        and tensor.dtype != tf.variant
        and tensor.op.type not in _NOT_ACTIVATIONS
    )
