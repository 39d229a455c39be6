"""The order the schedules enforce, read from a profiler timeline of one
training step (`benchmarks/timeline.py`): under 1F1B, stage s of p runs
micro-batch i's forward after its backward of micro-batch i - (p - s) and
its forwards in micro-batch order; under GPipe no backward starts before
every forward has ended (the loss is the whole batch's). These orders are
control and data dependencies of the graph, so every run shows them."""

import pathlib
import sys

import keras
import numpy as np
import pytest
from transparency import devices

import keras_parallel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import timeline  # noqa: E402
from timeline import BACKWARD, FORWARD  # noqa: E402

STAGES, MICROBATCHES = 2, 4


def recorded(schedule, recompute=False) -> timeline.Timeline:
    strategy = keras_parallel.PipelineParallel(
        devices(STAGES), MICROBATCHES, schedule=schedule, recompute=recompute
    )
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((32,))]
            + [keras.layers.Dense(64, activation="relu") for _ in range(4)]
        )
        model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(16 * MICROBATCHES, 32))
    found = timeline.record(model, x.astype("float32"), x[:, :1].astype("float32"))
    # Every stage's forward and backward of every micro-batch is read.
    assert sorted((i.device, i.microbatch, i.phase) for i in found.intervals) == sorted(
        (device, m, phase)
        for device in devices(STAGES)
        for m in range(MICROBATCHES)
        for phase in (FORWARD, BACKWARD)
    )
    return found


@pytest.mark.parametrize("recompute", [False, True])
def test_1f1b_runs_a_forward_after_the_backward_p_minus_s_before(recompute):
    found = recorded("1f1b", recompute)
    for stage, device in enumerate(devices(STAGES)):
        bound = STAGES - stage
        for i in range(1, MICROBATCHES):
            forward = found.interval(device, i, FORWARD)
            assert forward.start >= found.interval(device, i - 1, FORWARD).end
            if i >= bound:
                backward = found.interval(device, i - bound, BACKWARD)
                assert forward.start >= backward.end, (device, i)
    # On the last stage (one micro-batch in flight) that fixes the whole order.
    assert found.order(devices(STAGES)[-1]) == [
        (i, phase) for i in range(MICROBATCHES) for phase in (FORWARD, BACKWARD)
    ]


def test_gpipe_starts_no_backward_before_the_last_forward_ends():
    found = recorded("gpipe")
    last_forward = max(i.end for i in found.intervals if i.phase == FORWARD)
    first_backward = min(i.start for i in found.intervals if i.phase == BACKWARD)
    assert first_backward >= last_forward
    # The last stage's forwards, then its backwards.
    order = found.order(devices(STAGES)[-1])
    assert [phase for _, phase in order] == [FORWARD] * MICROBATCHES + [
        BACKWARD
    ] * MICROBATCHES
