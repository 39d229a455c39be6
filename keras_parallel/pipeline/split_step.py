"""A training step run once per micro-batch, its optimizer once per step.

Under a schedule that interleaves forwards and backwards (1F1B), each
micro-batch needs a loss and a backward of its own. The model's training
step therefore runs once per micro-batch, in one traced graph; each run's
loss counts by the micro-batch's share n_i / n of the batch (on the loss
when the step calls `optimizer.scale_loss`, as Keras' own `train_step` does,
else on its gradients), and the optimizer the step reaches answers to
`AccumulatedOptimizer` before its own class (`specialize.py`): it sums the
runs' gradients and applies the sum once, after the last run, as one device
applies the whole batch's gradient. The metrics accumulate over the runs as
over batches; the step's logs are the last run's metric results and, for
other values (a loss a custom `train_step` returns), the share-weighted sum.

A step that applies gradients more than once (a GAN's two optimizers, the
second reading what the first updated) cannot be deferred this way and is
refused; GPipe runs it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_parallel.pipeline.microbatch import piece_shares, split
from keras_parallel.sparse_gradients import plus, times
from keras_parallel.specialize import specialized


def _split_step():
    return getattr(tf.distribute.get_strategy().extended, "split_step", None)


class AccumulatedOptimizer:
    """Mixed in before an optimizer's class while a split step is traced."""

    def scale_loss(self, loss):
        step = _split_step()
        if step is not None:
            loss = step.weighted_loss(loss)
        return super().scale_loss(loss)

    def apply(self, grads, trainable_variables=None):
        step = _split_step()
        if step is None:
            return super().apply(grads, trainable_variables)
        return step.accumulate(self, list(grads), trainable_variables, super().apply)


class RecordedResult:
    """Mixed in before a metric's class while a split step is traced: the
    step's logs take the last run's values of what `result()` returns."""

    def result(self):
        value = super().result()
        step = _split_step()
        if step is not None:
            step.results.update(map(id, tf.nest.flatten(value)))
        return value


class SplitStep:
    """The state of one training step traced once per micro-batch.

    Args:
        num_microbatches: The runs of the step.
        shares: Each micro-batch's share n_i / n of the batch (scalars).
        trace: The `step_trace.StepTrace` of the step, told the sums.
    """

    def __init__(self, num_microbatches: int, shares: list, trace):
        self.num_microbatches = num_microbatches
        self.trace = trace
        self.shares = shares
        self.index = 0
        self.results: set[int] = set()
        self._weighted = False
        self._sums: list | None = None
        self._optimizer = None
        self._applied = False

    def start(self, index: int) -> None:
        """Run `index` of the step begins."""
        self.index, self._weighted, self._applied = index, False, False

    def weighted_loss(self, loss):
        """The run's loss times its micro-batch's share."""
        self._weighted = True
        return loss * tf.cast(self.shares[self.index], loss.dtype)

    def accumulate(self, optimizer, grads: list, variables, apply):
        """Adds a run's gradients to the sum; after the last run, applies
        the sum with `apply` (the optimizer's own) and returns its result."""
        if self._applied or self._optimizer not in (None, optimizer):
            raise ValueError(
                "PipelineParallel(schedule='1f1b') runs the training step once "
                "per micro-batch and applies the summed gradients once, after "
                "the last; this model's train_step applies gradients more than "
                f"once per step (optimizers {self._optimizer.name!r} and "
                f"{optimizer.name!r}), and a later update may read an earlier "
                "one. Use schedule='gpipe', which runs the step once."
            )
        self._optimizer, self._applied = optimizer, True
        if not self._weighted:
            share = self.shares[self.index]
            grads = [None if g is None else times(g, share) for g in grads]
        if self._sums is None:
            self._sums = grads
        else:
            self._sums = [plus(a, b) for a, b in zip(self._sums, grads, strict=True)]
        self.trace.accumulated(self._sums)
        if self.index == self.num_microbatches - 1:
            return apply(self._sums, variables)
        return None

    def logs(self, outputs: list):
        """The step's logs from each run's (see the module docstring)."""

        def combine(*values):
            value = values[-1]
            if (
                id(value) in self.results
                or not isinstance(value, tf.Tensor)
                or value.shape.rank != 0
                or not value.dtype.is_floating
            ):
                return value
            return tf.add_n(
                [
                    v * tf.cast(s, v.dtype)
                    for v, s in zip(values, self.shares, strict=True)
                ]
            )

        return tf.nest.map_structure(combine, *outputs)


def run_split(fn, args, kwargs, num_microbatches: int, trace, objects):
    """`fn(*args, **kwargs)` (a training step) once per micro-batch of a
    batch with at least `num_microbatches` samples.

    Args:
        fn: The step.
        args: Its arguments; `kwargs`: its keyword arguments.
        num_microbatches: M.
        trace: The `step_trace.StepTrace` of the step.
        objects: `(optimizers, metrics)` the step may reach.

    Returns:
        The step's logs (`SplitStep.logs`).
    """
    optimizers, metrics = objects
    shares = piece_shares(batch_size(args, kwargs), num_microbatches)
    step = SplitStep(num_microbatches, shares, trace)
    extended = tf.distribute.get_strategy().extended
    outputs = []
    extended.split_step = step
    try:
        with (
            specialized(optimizers, AccumulatedOptimizer),
            specialized(metrics, RecordedResult),
        ):
            for i, (a, k) in enumerate(split((args, kwargs), num_microbatches)):
                step.start(i)
                with trace.piece(i):
                    outputs.append(fn(*a, **k))
    finally:
        extended.split_step = None
    return step.logs(outputs)


def batch_size(args, kwargs) -> tf.Tensor | int | None:
    """The number of samples of a step's arguments (the first batched
    tensor's first dimension: an int when known while tracing), or None
    when none is batched."""
    for x in tf.nest.flatten((args, kwargs)):
        if isinstance(x, tf.Tensor) and x.shape.rank:
            return tf.shape(x)[0] if x.shape[0] is None else x.shape[0]
    return None


def by_batch_size(batch, num_microbatches: int, full, short):
    """`full()` when the batch has at least `num_microbatches` samples (every
    micro-batch has some), else `short()`: decided while tracing when the
    batch size is known, else by a `tf.cond` (each branch holds a whole
    training step, its backward included)."""
    known = None if batch is None else tf.get_static_value(batch)
    if batch is None or known is not None:
        return full() if batch is None or known >= num_microbatches else short()
    return tf.cond(batch >= num_microbatches, full, short)


def step_objects(model: keras.Model) -> tuple[list, list]:
    """The optimizers a model's training step may apply (its `optimizer`
    and any other it holds, as a GAN's `d_optimizer`) and its metrics."""
    found = [model.optimizer] if model.optimizer is not None else []
    for value in vars(model).values():
        if isinstance(value, keras.optimizers.Optimizer) and value not in found:
            found.append(value)
    return found, list(model.metrics)
