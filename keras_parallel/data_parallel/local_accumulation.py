"""Gradient accumulation that communicates once per optimizer update.

With `gradient_accumulation_steps=k` Keras adds each step's gradient to an
accumulator and updates the weights every k-th step. Reducing every step's
gradient across replicas first would send k times what the update needs.
Instead, as PyTorch DDP's `no_sync` does, each replica adds its own partial
gradient to its own copy of the accumulator, and the copies are summed only
when the update reads them.

Keras' accumulators become sync-on-read variables with SUM aggregation,
tf.distribute's own form of per-replica state whose value is the sum of its
copies: read (by the update, `get_weights`, saving or a checkpoint) they equal
the accumulator of single-device training, and assigned (Keras' reset,
loading) every copy takes its share. While the optimizer applies once on the
reduced step, the update's reads of all accumulators are served by one
batched, bucketed (optionally compressed) reduction, traced inside Keras' own
update branch, so it runs on update steps only.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from keras_parallel._tf_internal import DistributedVariable, PerReplica

# The name Keras' `BaseOptimizer.build` gives its accumulators; together with
# a model variable as `colocate_with` it marks one being created.
_ACCUMULATOR_NAME = "gradient_accumulator"


def is_accumulator(kwargs: dict) -> bool:
    """Whether variable-creation `kwargs` are those of a Keras gradient
    accumulator for a distributed model variable."""
    return isinstance(kwargs.get("colocate_with"), DistributedVariable) and str(
        kwargs.get("name", "")
    ).endswith(_ACCUMULATOR_NAME)


class LocalAccumulators:
    """Keras' gradient accumulators, one replica-local copy per device.

    Args:
        batch_reduce: `fn(pairs) -> list`, the strategy's gradient reduction
            of `(PerReplica, destinations)` pairs (a SUM, cross-replica).
        local_results: `fn(value) -> tuple`, a value's per-device parts.
    """

    def __init__(self, batch_reduce, local_results):
        self._batch_reduce = batch_reduce
        self._local_results = local_results
        self._of_variable: dict[int, list] = {}
        self._reading: list = []
        self._sums: dict = {}

    def create(self, create_variable, kwargs: dict):
        """Creates an accumulator as a sync-on-read SUM variable on every
        device of its model variable, by `create_variable(**kwargs)`."""
        reference = kwargs["colocate_with"]
        kwargs = dict(
            kwargs,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
        accumulator = create_variable(**kwargs)
        self._of_variable.setdefault(id(reference), []).append((reference, accumulator))
        return accumulator

    def of(self, optimizer, variables) -> list | None:
        """The optimizer's local accumulator of each variable, or None when
        it does not accumulate gradients or its accumulators are not ours."""
        if not getattr(optimizer, "gradient_accumulation_steps", None):
            return None
        own = {id(v.value) for v in optimizer.variables}
        found = []
        for variable in variables:
            value = getattr(variable, "value", variable)
            match = [
                acc
                for ref, acc in self._of_variable.get(id(value), ())
                if ref is value and id(acc) in own
            ]
            if len(match) != 1:
                return None
            found.append(match[0])
        return found

    def add(self, accumulators, grads) -> None:
        """Adds each replica's gradient to its own copy (no communication)."""
        for accumulator, grad in zip(accumulators, grads, strict=True):
            if grad is None:
                continue
            parts = self._local_results(grad)
            if len(parts) == 1:
                # One tensor for all replicas (merge_call regroups a value
                # every replica passed as that value): each adds it.
                parts = parts * len(accumulator.values)
            for copy, part in zip(accumulator.values, parts, strict=True):
                with tf.device(copy.device):
                    if isinstance(part, tf.IndexedSlices):
                        copy.scatter_add(part)
                    else:
                        copy.assign_add(tf.cast(part, copy.dtype))

    @contextlib.contextmanager
    def reading(self, accumulators):
        """Context in which reads of `accumulators` are served by `read`."""
        self._reading = list(accumulators)
        try:
            yield
        finally:
            self._reading = []
            self._sums = {}

    def read(self, value, destinations):
        """The sum of an accumulator being read, or None for other values.

        The first read in a graph reduces all accumulators of the update in
        one batch; the others take their part of it.
        """
        if not any(value is acc for acc in self._reading):
            return None
        graph = tf.compat.v1.get_default_graph()
        if graph not in self._sums:
            pairs = [(PerReplica(_read(acc)), acc) for acc in self._reading]
            self._sums[graph] = dict(
                zip(map(id, self._reading), self._batch_reduce(pairs), strict=True)
            )
        return _on(destinations, self._local_results(self._sums[graph][id(value)]))


def _read(accumulator) -> tuple:
    # Each copy read on its own device, as the engine's parts must be.
    parts = []
    for copy in accumulator.values:
        with tf.device(copy.device):
            parts.append(copy.read_value())
    return tuple(parts)


def _on(device, parts):
    # The part on `device` (a read's destination), else the first: a copy
    # follows wherever the value is used.
    if isinstance(device, str) and device:
        wanted = tf.DeviceSpec.from_string(device)
        for part in parts:
            spec = tf.DeviceSpec.from_string(part.device)
            if (spec.device_type, spec.device_index) == (
                wanted.device_type,
                wanted.device_index,
            ) and wanted.task in (None, spec.task):
                return part
    return parts[0]
