"""Local SGD and DiLoCo: replicas train alone for `sync_every` steps, then
meet.

With `DataParallel(sync_every=H)` each replica applies its own gradients to
its own copy of the weights, with its own optimizer state, and every H
optimizer steps the replicas average what they learnt since they last met
(local SGD: Stich 2019; Lin et al. 2020). With an `outer_optimizer`, the
averaged change is the gradient of an outer optimizer that moves the
synchronized weights (DiLoCo: Douillard et al. 2023, Nesterov momentum).

Outside a training step the model holds the synchronized weights, so that
`evaluate`, `predict`, saving, callbacks and `get_weights` see what the
replicas agreed on last. Each replica's own weights live in a copy the
strategy keeps (`working`); a training step loads them into the model's
copy on that replica first, and afterwards stores them back and puts the
synchronized weights (`anchor`) in place again, or, every H steps, averages
the replicas' changes into new synchronized weights everywhere. What a
replica learnt since the last synchronization stays in its copy until the
next one, also across `fit` calls. A write from outside a step
(`set_weights`, loading a checkpoint) replaces all three copies.

The replicas send the change of each floating weight since the last
synchronization (trainable weights and state such as BatchNormalization's
moving statistics) through the reduction engine, so buckets and compression
apply to it: one all-reduce of the weights' bytes every H steps instead of
the gradients' every step. Integer state (random seeds, counters) is each
replica's own.
"""

from __future__ import annotations

import weakref
from copy import deepcopy

import keras
import tensorflow as tf

from keras_parallel._tf_internal import Mirrored, UpdateContext
from keras_parallel.data_parallel.batch_split import if_has_samples


class PeriodicAveraging:
    """Working and synchronized copies of each model weight, and the
    synchronization every `sync_every` steps.

    Args:
        sync_every: Optimizer updates between synchronizations (> 1).
        make_outer: Makes a new outer optimizer (in the strategy's scope);
            None for the plain average.
    """

    def __init__(self, sync_every: int, make_outer):
        self.sync_every = sync_every
        self._make_outer = make_outer
        # For the weights trained last: (their ids, the training steps taken,
        # the outer optimizer or None).
        self._state: tuple | None = None
        # id of the model's tf variable -> (it, weakly; working; anchor).
        self._copies: dict[int, tuple] = {}
        # The optimizers that stepped in the traced step.
        self._stepping: list = []

    def __repr__(self) -> str:
        return f"PeriodicAveraging(sync_every={self.sync_every})"

    def tracked(self, models, strategy) -> list:
        """`(variable, working, anchor)` for every floating weight of
        `models`, the copies made on first sight (from the weight's current,
        synchronized value)."""
        self._stepping = []  # what a failed trace may have left
        # A model gone (a notebook cell run again) takes its copies along.
        self._copies = {k: v for k, v in self._copies.items() if v[0]() is not None}
        entries = []
        for model in models:
            for weight in model.weights:
                variable = weight.value
                if not variable.dtype.is_floating:
                    continue
                entries.append(self._entry(variable, weight, strategy))
        entries = list({id(e[0]): e for e in entries}.values())
        self._start(entries, models, strategy)
        return entries

    def _start(self, entries, models, strategy) -> None:
        # A step counter and an outer optimizer per set of weights: a new
        # model (a notebook cell run again) starts afresh.
        key = tuple(id(variable) for variable, _, _ in entries)
        if self._state is not None and self._state[0] == key:
            return
        optimizer = getattr(models[0], "optimizer", None) if models else None
        with tf.init_scope(), strategy.scope():
            # Resumed training (its optimizer restored) goes on counting.
            done = (
                0
                if optimizer is None
                else int(tf.convert_to_tensor(optimizer.iterations))
            )
            steps = tf.Variable(
                done * _steps_per_update(optimizer),
                dtype=tf.int64,
                trainable=False,
                name="local_steps",
            )
            outer = None
            if self._make_outer is not None:
                outer = self._make_outer()
                outer.build([a for _, _, a in entries if a.trainable])
        self._state = (key, steps, outer)

    def _entry(self, variable, weight, strategy):
        known = self._copies.get(id(variable))
        if known is not None and known[0]() is variable:
            return (variable, known[1], known[2])
        # Outside the traced step, in the strategy's scope: mirrored copies.
        with tf.init_scope(), strategy.scope():
            value = variable.values[0].read_value()
            working = tf.Variable(value, trainable=False, name="working")
            # A Keras variable, so that the outer optimizer can update it.
            anchor = keras.Variable(
                value, dtype=value.dtype, trainable=weight.trainable, name="anchor"
            )
        self._copies[id(variable)] = (weakref.ref(variable), working, anchor)
        return (variable, working, anchor)

    def copies_of(self, variable) -> tuple | None:
        """`(working, anchor)` of a model variable, or None."""
        known = self._copies.get(id(variable))
        if known is None or known[0]() is not variable:
            return None
        return known[1], known[2]

    def after_outside_write(self, variable) -> None:
        """A value written into `variable` outside a step (set_weights, a
        loaded checkpoint) becomes every replica's working and synchronized
        value too."""
        copies = self.copies_of(variable)
        if copies is None:
            return
        working, anchor = copies
        _copy_each(variable, [working, anchor.value])

    def load_working(self, entries) -> None:
        """Before a training step: each replica's own weights into the
        model."""
        for variable, working, _ in entries:
            _copy_each(working, [variable])

    def stepping(self, optimizer) -> None:
        """Notes that `optimizer` steps in the step being traced."""
        self._stepping.append(optimizer)

    def finish_step(self, entries, sum_over_replicas, num_replicas, sizes) -> None:
        """After a training step: every `sync_every` optimizer updates
        (`sync_every` x `gradient_accumulation_steps` steps, counted alike on
        every replica and worker), synchronize; otherwise keep each replica's
        weights and put the synchronized ones back into the model. A replica
        whose piece of the batch was empty (a short last batch) did not step,
        and what its forward pass did to its weights (BatchNormalization's
        statistics of no samples) is undone.

        Args:
            entries: What `tracked` returned for the step.
            sum_over_replicas: `f(per_tensor_parts) -> per_tensor_parts`, the
                sum over all replicas of each tensor, on each local device.
            num_replicas: Replicas in sync (all workers).
            sizes: Samples of each local replica's piece, or None.
        """
        stepping, self._stepping = self._stepping, []
        for i, size in enumerate(sizes or []):
            if_has_samples(
                size,
                lambda: tf.constant(False),
                lambda i=i: self._undo_step(entries, i),
            )
        if not stepping:
            self._keep(entries)
            return
        steps = self._state[1]
        steps.assign_add(1)
        every = self.sync_every * _steps_per_update(stepping[0])
        due = tf.equal(tf.math.floormod(steps.read_value(), every), 0)

        def synchronize():
            self._synchronize(entries, sum_over_replicas, num_replicas)
            return tf.constant(True)

        def keep():
            self._keep(entries)
            return tf.constant(False)

        tf.cond(due, synchronize, keep)

    @staticmethod
    def _undo_step(entries, replica: int):
        for variable, working, _ in entries:
            with tf.device(variable.values[replica].device):
                variable.values[replica].assign(working.values[replica])
        return tf.constant(True)

    def _keep(self, entries) -> None:
        for variable, working, anchor in entries:
            _copy_each(variable, [working])
            _copy_each(anchor.value, [variable])

    def _synchronize(self, entries, sum_over_replicas, num_replicas) -> None:
        changes = []
        for variable, _, anchor in entries:
            parts = []
            for copy, start in zip(variable.values, anchor.value.values, strict=True):
                with tf.device(copy.device):
                    parts.append(copy.read_value() - start.read_value())
            changes.append(parts)
        sums = sum_over_replicas(changes)
        outer_steps, outer_gradients = [], []
        for (_, _, anchor), parts in zip(entries, sums, strict=True):
            means = []
            for part in parts:
                with tf.device(part.device):
                    means.append(part / tf.cast(num_replicas, part.dtype))
            if self._make_outer is not None and anchor.trainable:
                # The outer gradient is the synchronized weights minus the
                # replicas' average: minus the average change.
                outer_steps.append(anchor)
                outer_gradients.append(Mirrored([-m for m in means]))
                continue
            for start, mean in zip(anchor.value.values, means, strict=True):
                with tf.device(start.device):
                    start.assign_add(mean)
        if outer_steps:
            self._state[2].apply(outer_gradients, outer_steps)
        for variable, working, anchor in entries:
            _copy_each(anchor.value, [variable, working])


def _steps_per_update(optimizer) -> int:
    return getattr(optimizer, "gradient_accumulation_steps", None) or 1


def _copy_each(source, targets) -> None:
    """Each device's copy of distributed variable `source` into the same
    device's copy of each of `targets`."""
    for i, copy in enumerate(source.values):
        with tf.device(copy.device), UpdateContext(i):
            value = copy.read_value()
            for target in targets:
                target.values[i].assign(value)


def outer_maker(identifier):
    """A function making a new outer optimizer from `identifier` (what
    Keras' `compile` takes: an instance, whose config is used, a name or a
    config dict), or None for None. Made only when the first step is traced,
    in the strategy's scope: a Keras optimizer instance holds variables, and
    across workers TensorFlow must not start before the strategy."""
    if identifier is None:
        return None
    if isinstance(identifier, keras.optimizers.Optimizer):
        cls, config = type(identifier), identifier.get_config()
        return lambda: cls.from_config(deepcopy(config))
    known = {
        name.lower()
        for name, value in vars(keras.optimizers).items()
        if isinstance(value, type) and issubclass(value, keras.optimizers.Optimizer)
    }
    if isinstance(identifier, str) and identifier.lower() in known:
        return lambda: keras.optimizers.get(identifier)
    if isinstance(identifier, dict) and {"class_name", "config"} <= set(identifier):
        return lambda: keras.optimizers.get(deepcopy(identifier))
    raise TypeError(
        "`outer_optimizer` must be a Keras optimizer (an instance such as "
        "`keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)`, its name, or "
        "a config dict such as `{'class_name': 'SGD', 'config': "
        "{'learning_rate': 0.7, 'momentum': 0.9, 'nesterov': True}}`), or None. "
        f"Received: outer_optimizer={identifier!r}"
    )
