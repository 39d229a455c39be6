"""What `PipelineParallel`'s arguments may be, and the stages they choose."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from keras_parallel import placement
from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.pipeline.recompute import recomputable


def check_partition(partition, devices) -> None:
    """Refuses a `partition` that is not "auto", "time", a list of positive
    stage sizes (one per device) or a dict naming the strategy's devices."""
    if isinstance(partition, str) and partition in ("auto", "time"):
        return
    if isinstance(partition, Mapping):
        # One at a time: several layers may name the same device.
        resolved = [resolve_devices(device)[0] for device in partition.values()]
        unknown = sorted(set(resolved) - set(devices))
        if unknown:
            raise ValueError(
                f"`partition` names devices {unknown} that are not among the "
                f"strategy's devices {list(devices)}."
            )
        return
    if isinstance(partition, (list, tuple)) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in partition
    ):
        if len(partition) != len(devices):
            raise ValueError(
                f"`partition` gives {len(partition)} stage sizes for "
                f"{len(devices)} devices; give one size per device."
            )
        return
    raise ValueError(
        "`partition` must be 'auto', 'time', a list of positive stage sizes "
        "(one per device), or a dict from layer name to device. Received: "
        f"partition={partition!r}"
    )


def check_recompute(recompute) -> None:
    """Refuses a `recompute` other than False, True or "auto"."""
    if not (isinstance(recompute, bool) or recompute == "auto"):
        raise ValueError(
            "`recompute` must be False, True or 'auto'. "
            f"Received: recompute={recompute!r}"
        )


def recomputing_stages(layers, devices, stage_devices, recompute) -> frozenset:
    """The indices of the stages that recompute; with `recompute=True`, one
    warning naming the stages with fewer than two layers to recompute."""
    if recompute is False:
        return frozenset()
    names: dict[int, list[str]] = {i: [] for i in range(len(stage_devices))}
    for layer, device in zip(layers, devices, strict=True):
        if device in stage_devices and not placement.places_itself(layer):
            if recomputable(layer):
                names[stage_devices.index(device)].append(layer.name)
    least = 2 if recompute == "auto" else 1
    chosen = frozenset(i for i, found in names.items() if len(found) >= least)
    little = [
        f"stage {i} ({short_device(stage_devices[i])}): "
        + (f"one layer, {found[0]!r}" if found else "no layer")
        for i, found in names.items()
        if len(found) < 2
    ]
    if recompute is True and little:
        warnings.warn(
            "PipelineParallel(recompute=True): these stages have fewer than "
            f"two layers to recompute: {'; '.join(little)}. Layers with "
            "non-trainable state are not recomputed, and a single layer's "
            "backward reads mostly the input the stage keeps anyway, so "
            "recomputing saves little there (recompute='auto' skips such "
            "stages). Training is the same.",
            stacklevel=2,
        )
    return chosen
