"""What PipelineParallel's traced step calls in place of the user's `call`s.

While PipelineParallel traces a step, the placed layers answer to a subclass
of their own class whose `call` runs the user's `call` on the layer's device,
forward and backward (`placement.run_on`), and the model to one whose `call`
cuts the batch into micro-batches and, on its first run, checks that data
does not flow around a cycle of stage devices. Nothing is set on the
instances; `specialize.specialized` gives each object its own class back
when the trace ends.
"""

from __future__ import annotations

import tensorflow as tf


def _extended():
    return tf.distribute.get_strategy().extended


class StagedLayer:
    """Mixed in before a placed layer's class while PipelineParallel traces.

    The strategy's extended provides `layer_call(layer, call)`.
    """

    def call(self, *args, **kwargs):
        return _extended().layer_call(self, super().call)(*args, **kwargs)


class StagedModel:
    """Mixed in before a placed model's class while PipelineParallel traces.

    The strategy's extended provides `model_call(model, call)`.
    """

    def call(self, *args, **kwargs):
        return _extended().model_call(self, super().call)(*args, **kwargs)
