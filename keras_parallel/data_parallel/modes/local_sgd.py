"""`LocalSGD` (`sync_every` > 1): replicas train alone and meet every
`sync_every` optimizer updates (local SGD; DiLoCo with an outer optimizer).

Each replica applies its own gradient to its own copy of the weights with
its own optimizer state: one optimizer `apply` per replica inside an update
context, which makes every read and write of a mirrored variable that
replica's copy. `periodic_averaging.PeriodicAveraging` keeps each replica's
working weights and the synchronized ones, and makes the meetings.
"""

from __future__ import annotations

import contextlib
import functools

import tensorflow as tf

from keras_parallel._tf_internal import (
    DistributedVariable,
    UpdateContext,
    get_update_replica_id,
)
from keras_parallel.data_parallel import batch_split
from keras_parallel.data_parallel.modes.base import Mode
from keras_parallel.data_parallel.periodic_averaging import PeriodicAveraging
from keras_parallel.reduction.engine import local_parts


class LocalSGD(Mode):
    """Replicas with their own weights and optimizer state, averaged every
    `sync_every` updates.

    Args:
        sync_every: Optimizer updates between two meetings (> 1).
        make_outer: Makes a new outer optimizer, or None for the plain
            average (`periodic_averaging.outer_maker`).
    """

    syncs_batch_norm = False

    def __init__(self, sync_every: int, make_outer):
        self.averaging = PeriodicAveraging(sync_every, make_outer)
        self._sizes = None  # of the training step being traced

    def __repr__(self) -> str:
        return f"LocalSGD(sync_every={self.averaging.sync_every})"

    def apply(self, engine, apply, grads, variables, optimizer):
        parts = [None if g is None else local_parts(g) for g in grads]
        self.averaging.stepping(optimizer)
        engine.steps_per_update = self.averaging.sync_every * (
            getattr(optimizer, "gradient_accumulation_steps", None) or 1
        )
        sizes = self._sizes or [None] * len(engine.devices)
        with engine.applying_once():
            for i, (device, size) in enumerate(zip(engine.devices, sizes, strict=True)):
                with tf.device(device), UpdateContext(i), tf.name_scope(f"replica_{i}"):

                    def step(i=i):
                        apply([None if p is None else p[i] for p in parts], variables)
                        return tf.constant(True)

                    # A replica without samples (a short last batch) does not
                    # step: its gradient is of nothing.
                    batch_split.if_has_samples(size, step, lambda: tf.constant(False))

    def update(self, engine, var, fn, args, kwargs, group):
        # A replica's own optimizer step updates its own copy; a write from
        # outside a step becomes every copy's, and the replicas' working and
        # synchronized values.
        replica = get_update_replica_id()
        if isinstance(replica, int) and isinstance(var, DistributedVariable):
            copy = var.values[replica]
            with tf.device(copy.device):
                return fn(copy, *args, **kwargs)
        result = engine.mirrored_update(var, fn, args, kwargs, group)
        if not engine.tracing:
            self.averaging.after_outside_write(var)
        return result

    @contextlib.contextmanager
    def step(self, engine, models, sizes, training):
        if not training:
            yield
            return
        entries = self.averaging.tracked(models, engine.container_strategy())
        self.averaging.load_working(entries)
        self._sizes = sizes
        try:
            yield
            with engine.applying_once():  # the outer optimizer applies once
                self.averaging.finish_step(
                    entries,
                    functools.partial(engine.sum_over_replicas, owner=self.averaging),
                    engine.num_replicas,
                    sizes,
                )
        finally:
            self._sizes = None

    def replica_loss_weight(self, engine, replica):
        # Each replica steps on the mean over its own samples, which a Keras
        # step's loss is; a custom loop's was divided by N.
        del replica
        seen = engine.loss_weights.replicas_seen(engine.num_replicas)
        return None if seen == 1 else float(seen)
