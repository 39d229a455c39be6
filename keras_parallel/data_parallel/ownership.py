"""Which device owns each mirrored variable's optimizer state and update."""

from __future__ import annotations

import tensorflow as tf


class OwnerTable:
    """Assigns each variable to the device with the fewest owned bytes so far.

    Assignment is greedy in creation order, so the same model built the same
    way always gets the same placement.

    Args:
        num_devices: Number of replica devices.
    """

    def __init__(self, num_devices: int):
        self._bytes = [0] * num_devices
        self._owner: dict[int, int] = {}

    def assign(self, variable: tf.Variable) -> int:
        """Picks and records the owner of `variable`; returns its index."""
        device = min(range(len(self._bytes)), key=self._bytes.__getitem__)
        self._bytes[device] += variable.shape.num_elements() * variable.dtype.size
        self._owner[id(variable)] = device
        return device

    def owner(self, variable: tf.Variable) -> int:
        """The owner index of `variable` (assigned now if it has none)."""
        if id(variable) not in self._owner:
            return self.assign(variable)
        return self._owner[id(variable)]

    @property
    def owned_bytes(self) -> list[int]:
        """Bytes of the variables owned by each device."""
        return list(self._bytes)
