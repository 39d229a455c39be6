"""Recomputation: a stage keeps only its inputs for the backward.

Without it, each placed layer's backward reads what its forward computed
(`placement.Taped`), so a stage holds every internal activation of every
micro-batch in flight. With it, the layers of a stage run their forward
without a tape and record their calls; when the backward reaches the stage,
the first gradient asked for replays the recorded calls from the stage's
inputs under a tape (Chen et al., 2016: memory for one extra forward), and
every layer's gradient is taken from that replay. The replay waits for the
gradient that asks for it (a control dependency): `tf.recompute_grad` leaves
the recomputation free to run as soon as its inputs exist, which can be
during the forward, and then nothing is saved (tensorflow/tensorflow#36981).

A layer with state its call updates or draws from (BatchNormalization's
moving statistics, Dropout's seed) is not replayed, so that the state moves
once per micro-batch as on one device: it keeps its own tape, and its outputs
are inputs of the replay.
"""

from __future__ import annotations

from contextlib import nullcontext

import tensorflow as tf

from keras_parallel._tf_internal import AutocastScope, autocast_scope
from keras_parallel.placement import Taped


def recomputable(layer) -> bool:
    """Whether replaying `layer`'s call leaves everything as one run would:
    it has no non-trainable state (statistics, seeds), and it is trainable
    (a frozen layer's variables all read as non-trainable)."""
    return not layer.non_trainable_variables


class StageReplay:
    """The calls one stage made for one micro-batch, replayed once for the
    backward.

    Args:
        device: The stage's device, where the replay runs.
        microbatch: The micro-batch's index (in the replay's op names).
    """

    def __init__(self, device: str, microbatch: int):
        self.device = device
        self.microbatch = microbatch
        self._calls: list[_Call] = []
        self._replayed = False

    @property
    def replayed(self) -> bool:
        """Whether the backward has replayed the calls (no more join)."""
        return self._replayed

    def keeper(self) -> _Call:
        """A `placement.run_on` backward for the stage's next layer call."""
        call = _Call(self)
        self._calls.append(call)
        return call

    def replay(self, after: list) -> None:
        """Runs the recorded calls again from the stage's inputs, once, after
        the tensors `after` (the first output gradients the backward gives
        the stage)."""
        if self._replayed:
            return
        self._replayed = True
        waits = [g for g in tf.nest.flatten(after) if isinstance(g, tf.Tensor)]
        recomputed: dict[int, tf.Tensor] = {}
        self.tape = tf.GradientTape(persistent=True)
        # Named so, the replay reads as part of the backward
        # (`graph_memory.py`).
        scope = tf.name_scope(f"recompute/microbatch_{self.microbatch}")
        with tf.device(self.device), tf.control_dependencies(waits), scope, self.tape:
            for call in self._calls:
                # Each call's gradient is with respect to its own inputs only:
                # cut from what made them, or a gradient would also flow back
                # through earlier calls of the stage, whose own gradients
                # TensorFlow adds (a skip connection would count twice).
                inputs = [
                    tf.stop_gradient(recomputed.get(id(x), x)) for x in call.inputs
                ]
                self.tape.watch(inputs)
                with AutocastScope(call.autocast) if call.autocast else nullcontext():
                    call.replayed = (inputs, call.run(inputs))
                recomputed.update(
                    zip(map(id, call.results), call.replayed[1], strict=True)
                )


class _Call(Taped):
    """One recorded layer call of a `StageReplay`: its forward keeps
    nothing, its gradient comes from the stage's replay."""

    def __init__(self, stage: StageReplay):
        self.stage = stage
        self.results: list = []

    def forward(self, run, tensors: list):
        self.run, self.inputs = run, tensors
        # The replay runs outside Keras' `__call__`: the mixed-precision
        # scope the call sees now is entered again there.
        scope = autocast_scope()
        self.autocast = None if scope is None else scope.dtype
        targets = run(tensors)

        def gradient(output_gradients, sources):
            self.stage.replay(after=output_gradients)
            inputs, targets = self.replayed
            return self.stage.tape.gradient(
                targets,
                inputs + sources[len(inputs) :],
                output_gradients=output_gradients,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        return targets, gradient

    def placed(self, results: list) -> None:
        self.results = results
