"""The strategies `plan` weighs, each with what it holds per device.

- `DataParallel(sharding=s)` for each of `modes.sharding_argument.MODES`.
- `PipelineParallel(num_microbatches=M, schedule=..., recompute=...)` for
  each schedule ("gpipe", "1f1b") and recompute (False, True), M being
  `default_microbatches(batch_size, p)`; left out when the model has fewer
  layers to place than devices.
- `MeshParallel` on a `DeviceMesh` of shape (N, 1), data parallelism with
  its optimizer state split. A model axis needs a `LayoutMap` saying which
  layers split and how they pair (column- then row-parallel), a choice of
  the model's design that `plan` does not make, so meshes with a model axis
  are not proposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_parallel.data_parallel import DataParallel
from keras_parallel.data_parallel.modes.sharding_argument import MODES
from keras_parallel.devices import short_device
from keras_parallel.mesh import MeshParallel
from keras_parallel.pipeline import PipelineParallel
from keras_parallel.planning.estimate import DeviceBytes, data_parallel_bytes
from keras_parallel.planning.pipeline_estimate import (
    pipeline_bytes,
    stage_of_layers,
)
from keras_parallel.planning.profile import ActivationProfile
from keras_parallel.planning.state import ModelState

SCHEDULES = ("gpipe", "1f1b")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One strategy and what it holds on each device.

    Attributes:
        name: The strategy as it would be written.
        devices: The devices, in order.
        per_device: One `DeviceBytes` per device, in the same order.
        fits: Whether every device's total is within the budget.
    """

    name: str
    devices: tuple[str, ...]
    per_device: tuple[DeviceBytes, ...]
    fits: bool
    _build: Callable[[], tf.distribute.Strategy] = dataclasses.field(repr=False)

    @property
    def largest(self) -> DeviceBytes:
        """The device holding the most (its numbers are the table's)."""
        return max(self.per_device, key=lambda d: d.total)

    @property
    def communication(self) -> int:
        """Bytes the busiest device sends per step."""
        return max(d.communication for d in self.per_device)

    def strategy(self) -> tf.distribute.Strategy:
        """A new strategy of this candidate on its devices.

        Returns:
            The strategy; build and compile the model in its `scope()`.

        Example:

        ```python
        plan = keras_parallel.plan(model, batch_size=64, device_memory=2**30)
        with plan.best.strategy().scope():
            model = build_model()
            model.compile(optimizer="adam", loss="mse")
        ```
        """
        return self._build()


def default_microbatches(batch_size: int, num_stages: int) -> int:
    """The number of micro-batches `plan` gives PipelineParallel: the
    largest divisor of `batch_size` not above 2 x the number of stages (so
    1F1B has at least p in flight to bound when the batch allows it)."""
    return max(m for m in range(1, 2 * num_stages + 1) if batch_size % m == 0)


def candidates(
    model: keras.Model,
    state: ModelState,
    profile: ActivationProfile,
    batch_size: int,
    devices: tuple[str, ...],
    budget: int,
) -> tuple[list[Candidate], list[str]]:
    """Every candidate strategy on `devices`, and why any was left out.

    Returns:
        (the candidates, the reasons for those left out).
    """
    n = len(devices)
    found, skipped = [], []

    def add(name, per_device, build):
        per_device = tuple(per_device)
        fits = all(d.total <= budget for d in per_device)
        found.append(Candidate(name, devices, per_device, fits, build))

    for sharding in MODES:
        held = data_parallel_bytes(state, profile, batch_size, n, sharding)
        add(
            f"DataParallel(sharding={sharding!r})",
            [held] * n,
            lambda s=sharding: DataParallel(devices=list(devices), sharding=s),
        )
    try:
        stages = stage_of_layers(model, devices, state)
    except ValueError as error:
        stages = None
        skipped.append(f"PipelineParallel: {error}")
    if stages is not None:
        m = default_microbatches(batch_size, n)
        for schedule in SCHEDULES:
            for recompute in (False, True):
                held = pipeline_bytes(
                    model, state, profile, stages, batch_size, m, schedule, recompute
                )
                add(
                    f"PipelineParallel(num_microbatches={m}, "
                    f"schedule={schedule!r}, recompute={recompute})",
                    held,
                    lambda s=schedule, r=recompute: PipelineParallel(
                        list(devices), num_microbatches=m, schedule=s, recompute=r
                    ),
                )
    held = data_parallel_bytes(state, profile, batch_size, n, "optimizer")

    def mesh():
        names = [short_device(d).lower() for d in devices]
        layout = keras.distribution.DeviceMesh((n, 1), ("batch", "model"), names)
        return MeshParallel(layout, batch_dim_name="batch")

    add(f"MeshParallel(DeviceMesh(({n}, 1)))", [held] * n, mesh)
    return found, skipped
