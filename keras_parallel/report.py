"""`placement_report`: where a model's weights and optimizer state live."""

from __future__ import annotations

import dataclasses

import keras

from keras_parallel.devices import short_device
from keras_parallel.placement import stage_layers, variable_bytes


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
    """One layer: its device (None for a layer without weights), parameter
    count and weight bytes."""

    layer: str
    device: str | None
    parameters: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class DeviceTotals:
    """Bytes held on one device: model weights and optimizer variables."""

    weight_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes


@dataclasses.dataclass(frozen=True)
class PlacementReport:
    """Per-layer rows and per-device totals, read from the variables
    themselves. `str(report)` is a table."""

    layers: list[LayerPlacement]
    devices: dict[str, DeviceTotals]

    def __str__(self) -> str:
        rows = [("layer", "device", "parameters", "bytes")]
        rows += [
            (r.layer, r.device or "-", f"{r.parameters:,}", f"{r.bytes:,}")
            for r in self.layers
        ]
        rows.append(("", "", "", ""))
        rows.append(("device", "weight bytes", "optimizer bytes", "total bytes"))
        rows += [
            (d, f"{t.weight_bytes:,}", f"{t.optimizer_bytes:,}", f"{t.total_bytes:,}")
            for d, t in self.devices.items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )


def placement_report(model: keras.Model) -> PlacementReport:
    """Where each layer's weights and each device's optimizer state live.

    A variable a strategy keeps on several devices counts on each of them
    with the bytes of its copy there (whole for a mirrored weight, the shard
    for a weight split by MeshParallel).

    A model built in a `PipelineParallel` scope is placed first if it was not
    yet (placement otherwise happens before its first step).

    Args:
        model: A built Keras model.

    Returns:
        A `PlacementReport`; print it for a table.

    Example:

    ```python
    print(keras_parallel.placement_report(model))
    ```
    """
    place = getattr(model.distribute_strategy, "place", None)
    if place is not None:
        place(model)
    weights: dict[str, int] = {}
    rows = []
    for layer in stage_layers(model):
        devices = set()
        for v in layer.variables:
            for copy in _copies(v):
                device = short_device(copy.device)
                devices.add(device)
                weights[device] = weights.get(device, 0) + variable_bytes(copy)
        rows.append(
            LayerPlacement(
                layer=layer.name,
                device=", ".join(sorted(devices)) or None,
                parameters=sum(v.value.shape.num_elements() for v in layer.variables),
                bytes=sum(variable_bytes(v.value) for v in layer.variables),
            )
        )
    state: dict[str, int] = {}
    optimizer = getattr(model, "optimizer", None)  # None before compile
    if optimizer is not None:
        for v in optimizer.variables:
            for copy in _copies(v):
                device = short_device(copy.device)
                state[device] = state.get(device, 0) + variable_bytes(copy)
    names = sorted(set(weights) | set(state), key=_device_order)
    totals = {d: DeviceTotals(weights.get(d, 0), state.get(d, 0)) for d in names}
    return PlacementReport(rows, totals)


def _copies(variable) -> list:
    """The TensorFlow variables holding a Keras variable: one per device for
    a strategy's mirrored or split variable (each copy counts where it is)."""
    value = variable.value
    return list(getattr(value, "values", None) or [value])


def _device_order(name: str):
    kind, _, index = name.rpartition(":")
    return kind, int(index) if index.isdigit() else 0
