"""Logical devices: splitting one physical device, and naming devices."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from keras_parallel._validation import check_int

DEVICE_TYPES = ("CPU", "GPU")


def virtual_devices(
    n: int, device_type: str = "CPU", memory_limit_mb: int | None = None
) -> list[str]:
    """Splits the first physical device of a type into `n` logical devices.

    TensorFlow fixes its device layout when it initialises, so this must run
    before anything else touches TensorFlow (building a model, creating a
    tensor, listing logical devices). Calling it again with the same `n` does
    nothing, so notebook cells can be re-run.

    Args:
        n: Number of logical devices, at least 1.
        device_type: `"CPU"` or `"GPU"`.
        memory_limit_mb: Memory of each logical GPU in MiB; required for
            GPUs, not allowed for CPUs.

    Returns:
        The names of the logical devices of that type, e.g.
        `["/device:CPU:0", "/device:CPU:1"]`.

    Raises:
        ValueError: for a bad argument, or when no device of that type exists.
        RuntimeError: when TensorFlow already initialised with another layout.

    Example:

    ```python
    import keras_parallel
    keras_parallel.virtual_devices(4)  # first thing in the program
    strategy = keras_parallel.DataParallel()  # the 4 logical CPUs
    ```
    """
    check_int("n", n, 1)
    if device_type not in DEVICE_TYPES:
        raise ValueError(
            f"`device_type` must be one of {DEVICE_TYPES}. "
            f"Received: device_type={device_type!r}"
        )
    if device_type == "GPU" and memory_limit_mb is None:
        raise ValueError(
            "Logical GPUs need `memory_limit_mb`, the memory of each one, "
            "e.g. virtual_devices(2, 'GPU', memory_limit_mb=4096)."
        )
    if device_type == "CPU" and memory_limit_mb is not None:
        raise ValueError(
            "`memory_limit_mb` applies to GPUs only; logical CPUs share the "
            f"host memory. Received: memory_limit_mb={memory_limit_mb!r}"
        )
    physical = tf.config.list_physical_devices(device_type)
    if not physical:
        raise ValueError(
            f"This machine has no physical {device_type}; use "
            "device_type='CPU' to split the CPU."
        )
    current = tf.config.get_logical_device_configuration(physical[0])
    if current is not None and len(current) == n:
        return _logical_names(device_type)
    config = [tf.config.LogicalDeviceConfiguration(memory_limit=memory_limit_mb)] * n
    try:
        tf.config.set_logical_device_configuration(physical[0], config)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices(device_type))
        if existing == n:
            return _logical_names(device_type)
        raise RuntimeError(
            f"TensorFlow is already initialised with {existing} logical "
            f"{device_type} device(s) ({_logical_names(device_type)}), so it "
            f"cannot be split into {n}. The layout is fixed once per process: "
            "restart the kernel (or process) and call "
            f"keras_parallel.virtual_devices({n}) before anything else uses "
            "TensorFlow."
        ) from None
    return _logical_names(device_type)


def _logical_names(device_type: str) -> list[str]:
    return [d.name for d in tf.config.list_logical_devices(device_type)]


def short_device(name: str) -> str:
    """`"/job:localhost/replica:0/task:0/device:CPU:1"` -> `"CPU:1"`."""
    return name.split("device:")[-1]


def memory_limit(device: str) -> int | None:
    """The memory of a logical GPU in bytes, as its configuration sets it
    (`virtual_devices(n, "GPU", memory_limit_mb=...)`), or None: TensorFlow
    reports no size for CPUs, which share the host's memory, nor for a GPU
    not split into logical devices.

    Args:
        device: A device name (`"GPU:0"`, `"/device:GPU:0"`, ...).

    Returns:
        Bytes, or None.
    """
    if "GPU" not in short_device(device):
        return None
    index = int(short_device(device).split(":")[-1])
    logical = []
    for gpu in tf.config.list_physical_devices("GPU"):
        logical.extend(tf.config.get_logical_device_configuration(gpu) or [None])
    if index >= len(logical) or logical[index] is None:
        return None
    limit = logical[index].memory_limit
    return None if limit is None else int(limit) * 2**20


def resolve_devices(devices: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validates and canonicalises a strategy's `devices` argument.

    Args:
        devices: A device name (`"GPU:0"`, `"/device:CPU:1"`, ...), a list of
            them, or None for all GPUs, else all logical CPUs.

    Returns:
        The canonical names, e.g. `("/job:localhost/replica:0/task:0/device:CPU:0",)`.

    Raises:
        ValueError: for an empty list, an unknown or duplicate device, or a
            mix of device types.
        TypeError: when `devices` is not a string or a list of strings.
    """
    if devices is None:
        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices(
            "CPU"
        )
        return tuple(_canonical(d.name) for d in found)
    if isinstance(devices, str):
        devices = [devices]
    if not isinstance(devices, Sequence) or not all(
        isinstance(d, str) for d in devices
    ):
        raise TypeError(
            "`devices` must be a device name or a list of device names such "
            f"as ['GPU:0', 'GPU:1']. Received: devices={devices!r}"
        )
    if not devices:
        raise ValueError(
            "`devices` is empty. Pass device names such as ['CPU:0', 'CPU:1'], "
            "or None for all local devices."
        )
    available = {_canonical(d.name): d.name for d in tf.config.list_logical_devices()}
    canonical = []
    for name in devices:
        try:
            full = _canonical(name)
        except ValueError:
            full = None
        if full not in available:
            raise ValueError(
                f"Unknown device {name!r}. This process has: "
                f"{sorted(available.values())}. To get more logical CPUs, call "
                "keras_parallel.virtual_devices(n) before TensorFlow initialises."
            )
        canonical.append(full)
    duplicates = sorted({d for d in devices if canonical.count(_canonical(d)) > 1})
    if duplicates:
        raise ValueError(
            f"`devices` names the same device more than once: {duplicates}. "
            f"Received: devices={list(devices)!r}"
        )
    types = sorted({tf.DeviceSpec.from_string(d).device_type for d in canonical})
    if len(types) > 1:
        raise ValueError(
            f"`devices` mixes device types {types}; all replicas must be of one "
            f"type. Received: devices={list(devices)!r}"
        )
    return tuple(canonical)


def _canonical(name: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    if spec.device_type is None or spec.device_index is None:
        raise ValueError(f"not a single device: {name!r}")
    return tf.DeviceSpec(
        job=spec.job or "localhost",
        replica=spec.replica or 0,
        task=spec.task or 0,
        device_type=spec.device_type.upper(),
        device_index=spec.device_index,
    ).to_string()
