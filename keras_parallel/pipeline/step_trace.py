"""What PipelineParallel keeps while it traces one step: which micro-batch
is being traced, each stage's forward and backward of each micro-batch, and
the stages' replays (`recompute.py`).

From these it wraps a placed layer's call: on the stage's device
(`placement.run_on`), after what the schedule makes the stage's forward wait
for (control dependencies), with the backward kept by a tape or recomputed.
"""

from __future__ import annotations

import contextlib
import functools

import tensorflow as tf

from keras_parallel import placement
from keras_parallel.devices import short_device
from keras_parallel.pipeline.recompute import StageReplay, recomputable
from keras_parallel.pipeline.schedule import Schedule


class StepTrace:
    """The state of one traced step.

    Args:
        schedule: The strategy's schedule.
        recompute: The indices of the stages that recompute.
        devices: The stages' devices, in order.
        cut: Whether the model's call is cut into micro-batches (not when
            the step itself runs once per micro-batch).
        full: Whether every micro-batch has samples (else those that may
            be empty run under a `tf.cond`, `empty_pieces.py`).
    """

    def __init__(
        self,
        schedule: Schedule,
        recompute: frozenset,
        devices: tuple[str, ...],
        cut: bool = True,
        full: bool = False,
    ):
        self.schedule = schedule
        self.recompute = recompute
        self.num_stages = len(devices)
        self._stages = {short_device(d): i for i, d in enumerate(devices)}
        self.cut, self.full = cut, full
        self.microbatch = 0
        # (stage, micro-batch) -> tensors of the stage's forward outputs,
        # of its backward's gradients, and its replay.
        self._forward: dict[tuple[int, int], list] = {}
        self._backward: dict[tuple[int, int], list] = {}
        self._replays: dict[tuple[int, int], StageReplay] = {}
        self._wait_ops: dict[tuple[int, int], list] = {}

    @contextlib.contextmanager
    def piece(self, index: int):
        """The context in which micro-batch `index` is traced (named
        `microbatch_<index>` in the graph)."""
        previous, self.microbatch = self.microbatch, index
        try:
            with tf.name_scope(f"microbatch_{index}"):
                yield
        finally:
            self.microbatch = previous

    def stage_call(self, layer, call, device: str, stage: int):
        """`call` (a placed layer's own) on its stage, in the schedule's
        order, its backward recomputed where the stage recomputes."""
        key = (stage, self.microbatch)
        replay = None
        if stage in self.recompute and recomputable(layer):
            replay = self._replays.get(key)
            # A step may call the model again after a backward (a GAN's
            # second loss): those calls form a replay of their own.
            if replay is None or replay.replayed:
                replay = self._replays[key] = StageReplay(device, key[1])

        def backward():
            keeper = replay.keeper() if replay is not None else placement.Taped()
            return _Recorded(
                keeper,
                self._forward.setdefault(key, []),
                self._backward.setdefault(key, []),
            )

        run = placement.run_on(call, device, backward=backward)

        @functools.wraps(call)
        def wrapped(*args, **kwargs):
            with tf.control_dependencies(self._waits(*key)):
                return run(*args, **kwargs)

        return wrapped

    def accumulated(self, sums: list) -> None:
        """Records the gradient sums made after the backward of the
        micro-batch being traced, each as part of the backward of the stage
        on whose device it is. So the schedule's waits include them, and
        Grappler keeps them as sums made in turn: it would otherwise rewrite
        the chain of sums into one AddN over every micro-batch, which holds
        every micro-batch's weight gradients until the last (measured: all
        8 x 32 MB of an 8 x Dense(1024) model at batch 8192)."""
        for total in sums:
            stage = (
                None if total is None else self._stages.get(short_device(total.device))
            )
            if stage is not None:
                self._backward.setdefault((stage, self.microbatch), []).append(total)

    def _waits(self, stage: int, microbatch: int) -> list:
        """What the forward of `microbatch` on `stage` waits for under a
        schedule that bounds the micro-batches in flight by k: the stage's
        forward of the micro-batch before (each stage takes them in order)
        and its backward of micro-batch `microbatch - k`."""
        bound = self.schedule.in_flight(stage, self.num_stages)
        if bound is None:
            return []
        if (stage, microbatch) not in self._wait_ops:
            waits = self._forward.get((stage, microbatch - 1), [])
            waits = waits + self._backward.get((stage, microbatch - bound), [])
            flat = tf.nest.flatten(waits, expand_composites=True)
            tensors = [t for t in flat if isinstance(t, tf.Tensor)]
            self._wait_ops[stage, microbatch] = (
                [tf.group(*tensors, name=f"stage_{stage}_waits")] if tensors else []
            )
        return self._wait_ops[stage, microbatch]


class _Recorded(placement.Taped):
    """A `run_on` backward that records the call's outputs and gradients
    for the schedule's waits."""

    def __init__(self, keeper, forward: list, backward: list):
        self._keeper, self._forward, self._backward = keeper, forward, backward

    def forward(self, run, tensors):
        targets, gradient = self._keeper.forward(run, tensors)

        def recorded(output_gradients, sources):
            grads = gradient(output_gradients, sources)
            self._backward.extend(g for g in grads if g is not None)
            return grads

        return targets, recorded

    def placed(self, results):
        self._keeper.placed(results)
        self._forward.extend(results)
