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
reduce-scattered or all-gathered one.
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
    n = num_replicas
    weights = list(state.weights)
    trainable = [w for w in weights if w.trainable]
    split_state = sharding is not None and state.elementwise
    if sharding == "parameters":
        weight_bytes = sum(
            part_bytes(w.bytes, w.rows, n) if w.splits else w.bytes for w in weights
        )
    else:
        weight_bytes = sum(w.bytes for w in weights)
    if sharding is None:
        slots = sum(b for w in weights for b, _ in w.slots)
    elif split_state:
        slots = sum(split_slot_bytes(w, n) for w in weights)
    else:
        slots = owned_slot_bytes(weights, n)
    if sharding in ("gradients", "parameters"):
        grads = sum(part_bytes(w.bytes, w.rows, n) for w in trainable)
    else:
        grads = sum(w.bytes for w in trainable)
    piece = math.ceil(batch_size / n)
    if sharding == "parameters":
        activations = _parameters_activations(state, profile, piece)
        gathered = max(
            (
                sum(w.bytes for w in weights if w.splits and w.layer == layer)
                for layer in {w.layer for w in weights}
            ),
            default=0,
        )
    else:
        activations = profile.bytes_at(piece, lambda r: r.bytes if r.readers else 0)
        gathered = 0
    return DeviceBytes(
        weights=weight_bytes,
        gradients=grads,
        optimizer=slots + state.other_optimizer_bytes,
        activations=round(activations),
        gathered=gathered,
        communication=round(_ring_bytes(state, n, sharding)),
    )


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


def _ring_bytes(state: ModelState, n: int, sharding: str | None) -> float:
    share = (n - 1) / n
    trainable = [w for w in state.weights if w.trainable]
    whole = sum(w.bytes for w in trainable)
    padded = sum(n * part_bytes(w.bytes, w.rows, n) for w in trainable)
    if sharding is None or not state.elementwise:
        return 2 * share * whole
    if sharding == "optimizer":
        gathered = sum(n * part_bytes(w.bytes, w.rows, n) for w in trainable if w.slots)
        return 2 * share * whole + share * gathered
    if sharding == "gradients":
        return 2 * share * padded
    regathered = sum(n * part_bytes(w.bytes, w.rows, n) for w in trainable if w.kernel)
    return share * (2 * padded + regathered)
