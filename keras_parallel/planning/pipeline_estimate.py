"""What each stage of `PipelineParallel` holds and sends.

Stages are PipelineParallel's own: `pipeline.plan.plan_devices` on the
model, balancing weights plus optimizer slots as the strategy does. With M
micro-batches of m = batch / M samples, stage s of p holds per micro-batch
what its layers' backward reads (measured per layer on one device,
`profile.py`). With recomputation it holds only the inputs of the layers it
replays; layers with non-trainable variables (BatchNormalization, Dropout's
seed) are not replayed and keep what their backward reads, and gradient
sums TensorFlow names outside any layer stay. GPipe holds all M
micro-batches at once; 1F1B at most min(M, p - s) on stage s. The step's
inputs are held whole on the first stage, and the loss there too.

A stage sends, per step, each tensor it makes that a later stage (or the
loss, on the first device) reads, and back the gradient of each tensor it
reads from another stage.
"""

from __future__ import annotations

import collections

import keras

from keras_parallel.pipeline.plan import plan_devices
from keras_parallel.pipeline.recompute import recomputable
from keras_parallel.pipeline.schedule import schedule_named
from keras_parallel.placement import stage_layers
from keras_parallel.planning.estimate import DeviceBytes
from keras_parallel.planning.profile import INPUT, LOSS, ActivationProfile
from keras_parallel.planning.state import ModelState


def stage_of_layers(
    model: keras.Model, devices: tuple[str, ...], state: ModelState
) -> list[int]:
    """The stage of each of `placement.stage_layers(model)`, as
    `PipelineParallel(devices)` places them.

    Raises:
        ValueError: the model has fewer layers (or groups of layers that
            must share a device) than devices.
    """
    layers = stage_layers(model)
    slot_bytes: dict[int, int] = collections.Counter()
    for variable, weight in zip(model.weights, state.weights, strict=True):
        slot_bytes[id(variable.value)] += sum(b for b, _ in weight.slots)
    planned = plan_devices(model, layers, devices, "auto", slot_bytes)
    return [devices.index(device) for device in planned]


def pipeline_bytes(
    model: keras.Model,
    state: ModelState,
    profile: ActivationProfile,
    stages: list[int],
    batch_size: int,
    num_microbatches: int,
    schedule: str,
    recompute: bool,
) -> list[DeviceBytes]:
    """What each stage of `PipelineParallel(num_microbatches, schedule,
    recompute)` holds, in stage order.

    Args:
        model: The model.
        state: Its variables.
        profile: Its measured activations.
        stages: The stage of each layer (`stage_of_layers`).
        batch_size: The global batch.
        num_microbatches: M.
        schedule: `"gpipe"` or `"1f1b"`.
        recompute: Whether every stage with a layer to replay recomputes.

    Returns:
        One `DeviceBytes` per stage.
    """
    p = max(stages) + 1
    layers = stage_layers(model)
    m = batch_size / num_microbatches
    result = []
    for s in range(p):
        here = {i for i, stage in enumerate(stages) if stage == s}
        replayed = {i for i in here if recomputable(layers[i])} if recompute else set()
        bound = schedule_named(schedule).in_flight(s, p)
        in_flight = num_microbatches if bound is None else min(num_microbatches, bound)
        per_microbatch = profile.bytes_at(m, _held(s, here, replayed, inputs=False))
        inputs = profile.bytes_at(batch_size, _held(s, here, replayed, inputs=True))
        weights = state.of_layers(here | ({None} if s == 0 else set()))
        result.append(
            DeviceBytes(
                weights=sum(w.bytes for w in weights),
                gradients=sum(w.bytes for w in weights if w.trainable),
                optimizer=sum(b for w in weights for b, _ in w.slots)
                + (state.other_optimizer_bytes if s == 0 else 0),
                activations=round(in_flight * per_microbatch + inputs),
                gathered=0,
                communication=round(profile.bytes_at(batch_size, _sent(s, stages))),
            )
        )
    return result


def _held(stage, here, replayed, inputs: bool):
    """`select` for `ActivationProfile.bytes_at`: the tensors a stage holds,
    the step's inputs (held whole) or the others (held per micro-batch)."""

    def select(r) -> int:
        if (r.producer == INPUT) != inputs:
            return 0
        readers = r.readers & here
        if stage == 0 and LOSS in r.readers:
            readers.add(LOSS)
        replay_input = bool(r.consumers & replayed) and r.producer not in replayed
        if not readers:
            return r.bytes if replay_input else 0
        kept = not replayed or readers - replayed or r.producer is None or replay_input
        return r.bytes if kept else 0

    return select


def _sent(stage, stages):
    """`select`: the bytes stage `stage` sends forward and backward."""

    def stage_of(layer):
        if layer in (LOSS, INPUT) or layer is None:
            return 0
        return stages[layer]

    def select(r) -> int:
        destinations = {stage_of(c) for c in r.consumers} - {stage_of(r.producer)}
        sent = 0
        if r.producer not in (None, INPUT) and stage_of(r.producer) == stage:
            sent += r.bytes * len(destinations)  # forward
        if stage in destinations and r.producer != INPUT:
            sent += r.bytes  # its gradient, backward
        return sent

    return select
