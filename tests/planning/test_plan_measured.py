"""The plan's bytes against what the real strategies hold and send.

For every candidate of `keras_parallel.plan` on three models (an MLP, a
convnet with BatchNormalization, a transformer block), the strategy it
builds traces one training step of the same model at the planned batch
(`graph_memory.traced_train_step`, as `fit` traces it first: the optimizer
is built, PipelineParallel places the layers, the reduction engine counts
its collectives); per device:

- weights and optimizer state against the bytes of the model's and the
  optimizer's variables there (`callbacks.memory.variable_bytes_by_device`'s
  count, split between the two);
- activations against `graph_memory.held_bytes` of the strategy's traced
  step; for PipelineParallel per (device, micro-batch), at the schedule's
  peak: every micro-batch for GPipe, the p - s largest on stage s for 1F1B,
  plus what no micro-batch owns (the step's inputs);
- communication against `communication_stats()["ring_bytes_per_step"]`
  where the strategy reports it (DataParallel, MeshParallel).
"""

import numpy as np
import pytest
from plan_models import BATCH, MODELS, compiled

import keras_parallel
from keras_parallel import graph_memory
from keras_parallel.devices import short_device
from keras_parallel.placement import variable_bytes

TOLERANCE = 0.10
# Two of the conftest's four logical devices: tracing a step costs time per
# replica (the plan was also checked on four, docs/plan.md).
DEVICES = ["CPU:0", "CPU:1"]

_PLANS = {}


def _plan(name):
    if name not in _PLANS:
        _PLANS[name] = keras_parallel.plan(
            compiled(name), batch_size=BATCH, devices=DEVICES, device_memory=2**30
        )
    return _PLANS[name]


def _by_device(variables):
    totals = {}
    for variable in variables:
        for copy in getattr(variable.value, "values", None) or (variable.value,):
            device = short_device(copy.device)
            totals[device] = totals.get(device, 0) + variable_bytes(copy)
    return totals


def _peak(held, devices, schedule):
    """Per device: what the schedule holds at once (see the module doc)."""
    p = len(devices)
    result = {}
    for s, device in enumerate(devices):
        pieces = sorted(
            (b for (d, mb), b in held.items() if d == device and mb is not None),
            reverse=True,
        )
        if schedule == "1f1b":
            pieces = pieces[: p - s]
        result[device] = held.get((device, None), 0) + sum(pieces)
    return result


def _close(predicted, measured, what):
    assert measured > 0 or predicted == 0, what
    ratio = predicted / measured if measured else 1.0
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{what}: predicted {predicted:,}, measured {measured:,} ({ratio:.3f})"
    )


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("index", range(9))
def test_candidate_bytes_match_the_strategy(model_name, index):
    plan = _plan(model_name)
    candidate = plan.candidates[index]
    strategy = candidate.strategy()
    with strategy.scope():
        model = compiled(model_name)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, *model.input_shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype("int32")
    graph = graph_memory.traced_train_step(model, x, y)
    devices = [short_device(d) for d in candidate.devices]
    weights = _by_device(model.variables)
    optimizer = _by_device(model.optimizer.variables)
    if candidate.name.startswith("PipelineParallel"):
        schedule = "1f1b" if "'1f1b'" in candidate.name else "gpipe"
        held = _peak(
            graph_memory.held_bytes(graph, by_microbatch=True), devices, schedule
        )
    else:
        held = graph_memory.held_bytes(graph)
    for device, predicted in zip(devices, candidate.per_device, strict=True):
        what = f"{candidate.name} on {device}"
        _close(predicted.weights, weights.get(device, 0), f"{what}: weights")
        _close(predicted.optimizer, optimizer.get(device, 0), f"{what}: optimizer")
        _close(predicted.activations, held[device], f"{what}: activations")
    if hasattr(strategy, "communication_stats"):
        measured = strategy.communication_stats()["ring_bytes_per_step"]
        _close(candidate.communication, measured, f"{candidate.name}: communication")
