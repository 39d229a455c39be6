"""What one device holds and sends under a strategy: `DeviceBytes`, and the
estimates for DataParallel's sharding modes (MeshParallel on a mesh with no
model axis trains as `sharding="optimizer"`).

Each replica of N takes ceil(batch / N) samples, so it holds the
activations of that many (measured on one device, `profile.py`). Under
`sharding="parameters"` a layer gathers its split weights whole while it
runs (the `gathered` column: the largest layer's), a layer other than a
plain Dense keeps its gathered kernel for the backward, and a plain Dense
reads its input for its kernel's gradient through a reshape of its own
(`parameter_shards.py`), which `graph_memory` counts as a tensor of its own.
Communication is what `communication_stats()["ring_bytes_per_step"]`
counts: 2(N-1)/N of each all-reduced buffer, (N-1)/N of each
reduce-scattered, all-gathered or broadcast one (the optimizer's 8-byte step
counter, which the sharded modes broadcast too, is left out).
"""

from __future__ import annotations

import dataclasses
import math

from keras_parallel.planning.profile import INPUT, ActivationProfile
from keras_parallel.planning.state import (
    ModelState,
    owned_slot_bytes,
    part_bytes,
    split_slot_bytes,
)


@dataclasses.dataclass(frozen=True)
class DeviceBytes:
    """Bytes one device holds during a training step, and sends per step.

    Attributes:
        weights: The model's variables kept there.
        gradients: The gradients kept there after the reduction.
        optimizer: The optimizer's variables kept there.
        activations: What the step holds for its backward there
            (`graph_memory.held_bytes`), at the schedule's peak.
        gathered: The largest layer's weights gathered whole while it runs
            (`sharding="parameters"`).
        communication: Bytes the device sends per step.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int
    communication: int

    @property
    def total(self) -> int:
        """Weights, gradients, optimizer state, activations and gathered
        weights."""
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.gathered
        )


def data_parallel_bytes(
    state: ModelState,
    profile: ActivationProfile,
    batch_size: int,
    num_replicas: int,
    sharding: str | None,
) -> DeviceBytes:
    """What each replica of `DataParallel(sharding=sharding)` holds.

    Args:
        state: The model's variables.
        profile: The model's measured activations.
        batch_size: The global batch.
        num_replicas: N, the devices.
        sharding: None, `"optimizer"`, `"gradients"` or `"parameters"`.

    Returns:
        The `DeviceBytes` of every replica (they hold the same).
    """
    mode = ESTIMATES[sharding]
    n = num_replicas
    activations, gathered = mode.activations(state, profile, math.ceil(batch_size / n))
    return DeviceBytes(
        weights=mode.weights(state, n),
        gradients=mode.gradients(state, n),
        optimizer=mode.slots(state, n) + state.other_optimizer_bytes,
        activations=round(activations),
        gathered=gathered,
        communication=round(mode.ring_bytes(state, n)),
    )


def _trainable(state: ModelState) -> list:
    return [w for w in state.weights if w.trainable]


def _padded(state: ModelState, n: int, keep=lambda w: True) -> int:
    """Bytes of the trainable weights cut in N equal row parts, padding kept."""
    return sum(n * part_bytes(w.bytes, w.rows, n) for w in _trainable(state) if keep(w))


class Replicated:
    """`sharding=None`: every replica holds everything; gradients all-reduced."""

    def weights(self, state: ModelState, n: int) -> int:
        return sum(w.bytes for w in state.weights)

    def slots(self, state: ModelState, n: int) -> int:
        return sum(b for w in state.weights for b, _ in w.slots)

    def gradients(self, state: ModelState, n: int) -> int:
        return sum(w.bytes for w in _trainable(state))

    def activations(self, state, profile, piece: int) -> tuple[float, int]:
        """(activations of `piece` samples, the largest gathered layer)."""
        return profile.bytes_at(piece, lambda r: r.bytes if r.readers else 0), 0

    def ring_bytes(self, state: ModelState, n: int) -> float:
        """`communication_stats()["ring_bytes_per_step"]`: 2(N-1)/N of each
        all-reduced buffer, (N-1)/N of each reduce-scattered or gathered one."""
        return 2 * (n - 1) / n * sum(w.bytes for w in _trainable(state))


class OptimizerSharded(Replicated):
    """`"optimizer"`: slots split by rows (elementwise optimizers) or owned
    whole by one replica; the updated parts gathered."""

    def slots(self, state: ModelState, n: int) -> int:
        if state.elementwise:
            return sum(split_slot_bytes(w, n) for w in state.weights)
        return owned_slot_bytes(state.weights, n)

    def ring_bytes(self, state: ModelState, n: int) -> float:
        # A weight whose state is split is updated in parts, then gathered;
        # any other (no slots, or a non-elementwise optimizer) is updated on
        # its owner device and broadcast.
        def split(w) -> bool:
            return state.elementwise and bool(w.slots)

        broadcast = sum(w.bytes for w in _trainable(state) if not split(w))
        gathered = _padded(state, n, split)
        return Replicated.ring_bytes(self, state, n) + (n - 1) / n * (
            gathered + broadcast
        )


class GradientSharded(OptimizerSharded):
    """`"gradients"`: also the summed gradients split (reduce-scatter)."""

    def gradients(self, state: ModelState, n: int) -> int:
        return sum(part_bytes(w.bytes, w.rows, n) for w in _trainable(state))

    def ring_bytes(self, state: ModelState, n: int) -> float:
        if not state.elementwise:
            return OptimizerSharded.ring_bytes(self, state, n)
        return 2 * (n - 1) / n * _padded(state, n)


class ParameterSharded(GradientSharded):
    """`"parameters"`: also the weights split, each layer gathering its own
    while it runs."""

    def weights(self, state: ModelState, n: int) -> int:
        return sum(
            part_bytes(w.bytes, w.rows, n) if w.splits else w.bytes
            for w in state.weights
        )

    def activations(self, state, profile, piece: int) -> tuple[float, int]:
        gathered = max(
            (
                sum(w.bytes for w in state.weights if w.splits and w.layer == layer)
                for layer in {w.layer for w in state.weights}
            ),
            default=0,
        )
        return _parameters_activations(state, profile, piece), gathered

    def ring_bytes(self, state: ModelState, n: int) -> float:
        if not state.elementwise:
            return Replicated.ring_bytes(self, state, n)
        regathered = _padded(state, n, lambda w: w.kernel)
        return (n - 1) / n * (2 * _padded(state, n) + regathered)


# DataParallel's `sharding` argument -> its estimate.
ESTIMATES = {
    None: Replicated(),
    "optimizer": OptimizerSharded(),
    "gradients": GradientSharded(),
    "parameters": ParameterSharded(),
}


def _parameters_activations(state, profile, piece) -> float:
    plain = state.plain_dense

    def select(r) -> int:
        counted = r.bytes if r.readers else 0
        if r.producer == INPUT and r.readers and r.readers <= plain:
            counted = 0  # read only through the Dense layers' reshapes
        copies = [
            layer
            for layer in r.consumers & plain
            if r.rank == 2 and r.producer not in (INPUT, None) and r.readers - {layer}
        ]
        return counted + r.bytes * len(copies)

    kept_whole = sum(w.bytes for w in state.weights if w.held_whole)
    return profile.bytes_at(piece, select) + kept_whole
