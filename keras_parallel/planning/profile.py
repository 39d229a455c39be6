"""What a model's training step holds for its backward, measured once on one
device and read per layer.

The model is cloned (`keras.models.clone_model`, its weights copied, compiled
from its own compile config, no strategy), its top-level layers renamed
`plan_layer_<i>` so that every op of the traced step names the layer it
belongs to. One training step is traced (`graph_memory.traced_train_step`)
at two small batches with generated inputs and targets; each tensor the
backward reads (`graph_memory.held_reads`) is recorded with the layer that
made it and the layers whose backward reads it, and each tensor a layer's
forward reads from outside it (its inputs). A selection of tensors (a
pipeline stage's, a replica's) is then measured at both batches and
extrapolated linearly to the batch asked for: a constant part (per-channel
statistics) and a part per sample.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import keras
import numpy as np

from keras_parallel import graph_memory
from keras_parallel.placement import stage_layers
from keras_parallel.sample_data import sample_inputs, sample_like

#: The batches the step is traced at.
TRACE_BATCHES = (8, 16)
#: A reader that is no layer: the loss, metrics, Keras' step around them.
LOSS = -1
#: The producer of the step's inputs (features and targets).
INPUT = -2

_LAYER = re.compile(r"(?:^|/)plan_layer_(\d+)(?:_\d+)?/")


@dataclasses.dataclass
class Record:
    """A tensor of the traced step.

    Attributes:
        bytes: Its size.
        rank: Its number of dimensions.
        producer: Index of the layer whose op made it, `INPUT`, or None
            (ops outside any layer: gradient sums TensorFlow names at top
            level, the loss).
        readers: Indices of the layers whose backward reads it (`LOSS` for
            backward ops in no layer).
        consumers: Indices of the layers whose forward reads it from
            outside the layer (it is their input; `LOSS` for the loss).
    """

    bytes: int
    rank: int
    producer: int | None
    readers: set = dataclasses.field(default_factory=set)
    consumers: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class ActivationProfile:
    """The tensors of one traced training step at each of `TRACE_BATCHES`.

    Attributes:
        traces: One `{tensor name: Record}` per traced batch.
        num_layers: The model's top-level layers (`placement.stage_layers`).
    """

    traces: list[dict[str, Record]]
    num_layers: int

    def bytes_at(self, batch: float, select: Callable[[Record], int]) -> float:
        """Bytes of the tensors `select` counts, at `batch` samples.

        Args:
            batch: Samples of the step (or micro-batch, or replica piece).
            select: `select(record)`: how many bytes of `record` to count
                (0 to leave it out, `record.bytes` to count it).

        Returns:
            The bytes measured at the two traced batches, extrapolated
            linearly to `batch`.
        """
        (b1, b2), (t1, t2) = TRACE_BATCHES, self.traces
        m1 = sum(select(r) for r in t1.values())
        m2 = sum(select(r) for r in t2.values())
        return max(0.0, m1 + (m2 - m1) * (batch - b1) / (b2 - b1))


def measure_profile(clone: keras.Model) -> ActivationProfile:
    """Traces the training step of a one-device clone (`one_device_clone`)
    at each of `TRACE_BATCHES`; its optimizer is built by the first.

    Args:
        clone: The clone.

    Returns:
        The step's `ActivationProfile`.
    """
    traces = []
    for batch in TRACE_BATCHES:
        x, y = sample_batch(clone, batch)
        graph = graph_memory.traced_train_step(clone, x, y)
        traces.append(_records(graph))
    return ActivationProfile(traces, len(stage_layers(clone)))


def one_device_clone(model: keras.Model) -> keras.Model:
    """A copy of `model` with no strategy: layers renamed `plan_layer_<i>`
    (their index among `placement.stage_layers(model)`), weights copied,
    compiled from the model's compile config."""
    index = {id(layer): i for i, layer in enumerate(stage_layers(model))}

    def clone_layer(layer):
        config = layer.get_config()
        if id(layer) in index:  # not an operation written as `a + b`
            config = dict(config, name=f"plan_layer_{index[id(layer)]}")
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    clone.compile_from_config(model.get_compile_config())
    return clone


def sample_batch(model: keras.Model, batch: int) -> tuple:
    """Inputs and targets of `batch` samples, of the model's shapes and
    dtypes (`sample_data`); a sparse cross-entropy's targets are integer
    class indices."""
    rng = np.random.RandomState(0)
    targets = []
    for output, loss in zip(model.outputs, _output_losses(model), strict=True):
        if "sparse" in str(loss).lower():
            targets.append(sample_like(output.shape[:-1], "int32", batch, rng))
        else:
            targets.append(sample_like(output.shape, output.dtype, batch, rng))
    y = targets[0] if len(targets) == 1 else targets
    return sample_inputs(model, batch), y


def layer_of(op_name: str) -> int | None:
    """The index of the clone's top-level layer an op belongs to."""
    match = _LAYER.search(op_name)
    return None if match is None else int(match.group(1))


def _output_losses(model: keras.Model) -> list:
    """The loss of each output, as compiled."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        names = getattr(model, "output_names", None) or list(loss)
        return [loss.get(name) for name in names]
    if isinstance(loss, (list, tuple)):
        return list(loss)
    return [loss] * len(model.outputs)


def _records(graph) -> dict[str, Record]:
    records: dict[str, Record] = {}

    def record(tensor) -> Record:
        if tensor.name not in records:
            producer = (
                INPUT if tensor.op.type == "Placeholder" else layer_of(tensor.op.name)
            )
            records[tensor.name] = Record(
                tensor.shape.num_elements() * tensor.dtype.size,
                tensor.shape.rank,
                producer,
            )
        return records[tensor.name]

    for tensor, op in graph_memory.held_reads(graph):
        reader = layer_of(op.name)
        record(tensor).readers.add(LOSS if reader is None else reader)
    for tensor, op in graph_memory.forward_reads(graph):
        consumer = layer_of(op.name)
        producer = (
            INPUT if tensor.op.type == "Placeholder" else layer_of(tensor.op.name)
        )
        if consumer is not None and consumer != producer:
            record(tensor).consumers.add(consumer)
        elif consumer is None and producer is not None and producer >= 0:
            # The loss reading the model's outputs.
            if "loss" in op.name:
                record(tensor).consumers.add(LOSS)
    return records
