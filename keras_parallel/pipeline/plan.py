"""Which device each layer goes to, from a `partition` argument."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from keras_parallel.devices import resolve_devices
from keras_parallel.pipeline.balance import balanced_stage_sizes
from keras_parallel.pipeline.layer_times import unit_times
from keras_parallel.pipeline.units import stage_units
from keras_parallel.placement import places_itself, variable_bytes


def layer_bytes(layer: keras.layers.Layer, slot_bytes: Mapping[int, int]) -> int:
    """Bytes of a layer's weights plus the optimizer slots kept for them.

    Args:
        layer: A built layer.
        slot_bytes: Slot bytes by `id()` of a weight's `tf.Variable`.
    """
    return sum(
        variable_bytes(v.value) + slot_bytes.get(id(v.value), 0)
        for v in layer.variables
    )


def plan_devices(
    model: keras.Model,
    layers: Sequence[keras.layers.Layer],
    devices: Sequence[str],
    partition,
    slot_bytes: Mapping[int, int],
) -> list[str]:
    """The device of each layer.

    Args:
        model: The model the layers belong to (its graph orders the stages).
        layers: The model's layers in order (`model.layers`, no InputLayer).
        devices: The stages' devices, in order.
        partition: `"auto"` (balance bytes), `"time"` (balance measured
            forward and backward time, `layer_times.unit_times`), a list of
            stage sizes, or a dict from layer name to device (already
            checked against `devices`).
        slot_bytes: Optimizer slot bytes per weight (see `layer_bytes`).

    Returns:
        The device of each of `layers`, in the same order.

    Raises:
        ValueError: more stages than layers (or than groups of layers that
            must share a device), stage sizes that do not add up to the
            number of layers, a dict naming unknown layers, or, with
            `"time"`, a model whose inputs are unknown (`layer_times`).
    """
    names = [layer.name for layer in layers]
    if isinstance(partition, Mapping):
        unknown = sorted(set(partition) - set(names))
        if unknown:
            raise ValueError(
                f"`partition` names layers {unknown} that the model does not "
                f"have. Its layers, in order: {names}."
            )
        device_by_name = {
            name: resolve_devices(device)[0] for name, device in partition.items()
        }
        planned, current = [], devices[0]
        for name in names:
            current = device_by_name.get(name, current)
            planned.append(current)
        return _pinned(layers, planned)
    # Layers that place themselves (OnDevice, tensor-parallel layers) belong
    # to no stage.
    staged = [layer for layer in layers if not places_itself(layer)]
    if not staged:
        return _pinned(layers, [devices[0]] * len(layers))
    units = stage_units(model, staged)
    if len(units) < len(devices):
        raise ValueError(_too_few_units(units, len(devices)))
    if partition in ("auto", "time"):
        if partition == "time":
            costs = unit_times(model, units, devices[0])
        else:
            costs = [
                sum(layer_bytes(layer, slot_bytes) for layer in unit) for unit in units
            ]
        sizes = balanced_stage_sizes(costs, len(devices))
        stage_of_unit = [stage for stage, size in enumerate(sizes) for _ in range(size)]
        device_of = {
            id(layer): devices[stage]
            for unit, stage in zip(units, stage_of_unit, strict=True)
            for layer in unit
        }
    else:
        # Sizes count layers in the order of the units (model.layers' order
        # for Sequential and subclassed models, the call order of a graph).
        ordered = [layer for unit in units for layer in unit]
        sizes = list(partition)
        if sum(sizes) != len(ordered):
            raise ValueError(
                f"`partition` stage sizes {sizes} add up to {sum(sizes)}, but "
                f"the model has {len(ordered)} layers to split into stages: "
                f"{[layer.name for layer in ordered]}."
            )
        stage_devices = [
            device
            for device, size in zip(devices, sizes, strict=True)
            for _ in range(size)
        ]
        device_of = {
            id(layer): device
            for layer, device in zip(ordered, stage_devices, strict=True)
        }
    planned = [
        devices[0] if places_itself(layer) else device_of[id(layer)] for layer in layers
    ]
    return _pinned(layers, planned)


def _too_few_units(units: list[list], num_devices: int) -> str:
    """The error for fewer units (`units.stage_units`) than devices."""
    names = [[layer.name for layer in unit] for unit in units]
    count = sum(len(unit) for unit in units)
    if all(len(unit) == 1 for unit in units):
        return (
            f"The model has {count} layers to split into stages, fewer than "
            f"the {num_devices} stages (one per device) PipelineParallel "
            f"needs: {[n for (n,) in names]}. Use fewer devices, e.g. "
            "`PipelineParallel(devices=[...])`."
        )
    return (
        f"The model's {count} layers form {len(units)} "
        f"{'group' if len(units) == 1 else 'groups'} that cannot be split over "
        f"devices, fewer than the {num_devices} stages (one per "
        f"device) PipelineParallel needs: {names}. A layer called more than "
        "once keeps the layers called between its calls on its device, so "
        "that data never flows back to an earlier stage. Use fewer devices "
        "(`PipelineParallel(devices=[...])`), or give the later calls layers "
        "of their own."
    )


def _pinned(layers, planned) -> list[str]:
    """Layers wrapped in `OnDevice` report their own device."""
    return [
        getattr(layer, "pinned_device", None) or device
        for layer, device in zip(layers, planned, strict=True)
    ]
