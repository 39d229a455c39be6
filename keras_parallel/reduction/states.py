"""The compression states of one reduction engine: one per optimizer.

A compression's memory (PowerSGD's error feedback) belongs to the gradients
of one model's optimizer on one strategy's devices, never to the compression
object, which a notebook may hand to several strategies and models.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping

import numpy as np

from keras_parallel.reduction.compression import (
    Compression,
    CompressionState,
    Total,
)


class CompressionStates:
    """States of `compression`, one per owner (optimizer) and replica group
    (a device mesh reduces each weight shard's gradients in its own group),
    in order of first use.

    An owner that is garbage-collected takes its state with it. Saved states
    restored before their owners have stepped wait for them, first saved to
    first owner.

    Args:
        compression: The compression whose `new_state` makes each state.
    """

    def __init__(self, compression: Compression):
        self._compression = compression
        # owner -> {group: state}
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._unowned: dict[int, CompressionState | None] = {}
        self._owner = None
        self._waiting: list[Mapping[str, np.ndarray]] = []
        self._waiting_workers = 1

    @contextlib.contextmanager
    def owned_by(self, owner):
        """Reductions inside the block use `owner`'s state."""
        outer, self._owner = self._owner, owner
        try:
            yield
        finally:
            self._owner = outer

    def current(self, group: int = 0) -> CompressionState | None:
        """The state of the current owner for replica group `group` (made on
        first use)."""
        if self._owner is None:
            states = self._unowned
        else:
            states = self._owned.setdefault(self._owner, {})
        if group not in states:
            states[group] = self._new()
        return states[group]

    def _new(self) -> CompressionState | None:
        state = self._compression.new_state()
        if state is not None and self._waiting:
            state.restore(self._waiting.pop(0), self._waiting_workers)
        return state

    def all(self) -> list[CompressionState]:
        """The live states, in order of first use (groups in order)."""
        states = [
            state
            for by_group in [*self._owned.values(), self._unowned]
            for _, state in sorted(by_group.items())
        ]
        return [state for state in states if state is not None]

    def save(self, total: Total | None = None) -> list[dict[str, np.ndarray]]:
        """Each live state's arrays, then those still waiting for an owner.

        Args:
            total: Sums a per-replica state over the replicas (see
                `CompressionState.arrays`); None: this process's.
        """
        return [state.arrays(total) for state in self.all()] + [
            dict(arrays) for arrays in self._waiting
        ]

    def restore(self, saved: list[Mapping[str, np.ndarray]], workers: int = 1) -> None:
        """Gives the i-th saved state to the i-th live state; the rest wait
        for the next owners.

        Args:
            saved: The states' arrays, as `save` returned them.
            workers: Workers training now (see `CompressionState.restore`).
        """
        live = self.all()
        for state, arrays in zip(live, saved, strict=False):
            state.restore(arrays, workers)
        self._waiting = list(saved[len(live) :])
        self._waiting_workers = workers
