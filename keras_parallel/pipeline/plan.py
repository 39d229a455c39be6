"""Which device each layer goes to, from a `partition` argument."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from keras_parallel.devices import resolve_devices
from keras_parallel.pipeline.balance import balanced_stage_sizes
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
    layers: Sequence[keras.layers.Layer],
    devices: Sequence[str],
    partition,
    slot_bytes: Mapping[int, int],
) -> list[str]:
    """The device of each layer.

    Args:
        layers: The model's layers in order.
        devices: The stages' devices, in order.
        partition: `"auto"`, a list of stage sizes, or a dict from layer name
            to device (already checked against `devices`).
        slot_bytes: Optimizer slot bytes per weight (see `layer_bytes`).

    Raises:
        ValueError: more stages than layers, stage sizes that do not add up
            to the number of layers, or a dict naming unknown layers.
    """
    names = [layer.name for layer in layers]
    if isinstance(partition, Mapping):
        unknown = sorted(set(partition) - set(names))
        if unknown:
            raise ValueError(
                f"`partition` names layers {unknown} that the model does not "
                f"have. Its layers, in order: {names}."
            )
        device_by_name = dict(
            zip(partition, resolve_devices(list(partition.values())), strict=True)
        )
        planned, current = [], devices[0]
        for name in names:
            current = device_by_name.get(name, current)
            planned.append(current)
        return _pinned(layers, planned)
    # Layers that place themselves (OnDevice, tensor-parallel layers) belong
    # to no stage.
    staged = [layer for layer in layers if not places_itself(layer)]
    staged_names = [layer.name for layer in staged]
    if not staged:
        return _pinned(layers, [devices[0]] * len(layers))
    if len(staged) < len(devices):
        raise ValueError(
            f"The model has {len(staged)} layers to split into stages, fewer "
            f"than the {len(devices)} stages (one per device) PipelineParallel "
            f"needs: {staged_names}. Use fewer devices, e.g. "
            "`PipelineParallel(devices=[...])`."
        )
    if partition == "auto":
        sizes = balanced_stage_sizes(
            [layer_bytes(layer, slot_bytes) for layer in staged], len(devices)
        )
    else:
        sizes = list(partition)
        if sum(sizes) != len(staged):
            raise ValueError(
                f"`partition` stage sizes {sizes} add up to {sum(sizes)}, but "
                f"the model has {len(staged)} layers to split into stages: "
                f"{staged_names}."
            )
    stage_devices = iter(
        device for device, size in zip(devices, sizes, strict=True) for _ in range(size)
    )
    planned = [
        devices[0] if places_itself(layer) else next(stage_devices) for layer in layers
    ]
    return _pinned(layers, planned)


def _pinned(layers, planned) -> list[str]:
    """Layers wrapped in `OnDevice` report their own device."""
    return [
        getattr(layer, "pinned_device", None) or device
        for layer, device in zip(layers, planned, strict=True)
    ]
