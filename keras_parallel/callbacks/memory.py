"""`DeviceMemoryMonitor`: memory per device."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_parallel.devices import short_device
from keras_parallel.placement import variable_bytes


def variable_bytes_by_device(model: keras.Model) -> dict[str, int]:
    """Bytes of the model's and its optimizer's variables on each device;
    a variable copied to several devices counts on each."""
    totals: dict[str, int] = {}
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + list(optimizer.variables if optimizer else [])
    for variable in variables:
        for copy in getattr(variable.value, "values", None) or (variable.value,):
            device = short_device(copy.device)
            totals[device] = totals.get(device, 0) + variable_bytes(copy)
    return totals


def _allocator_bytes(device: str) -> int | None:
    # TensorFlow tracks allocations on GPUs; for CPUs it reports zeros.
    if not device.startswith("GPU"):
        return None
    try:
        return tf.config.experimental.get_memory_info(device)["peak"]
    except (ValueError, tf.errors.OpError):
        return None


class DeviceMemoryMonitor(keras.callbacks.Callback):
    """Logs memory per device each epoch and prints a table after training.

    Where TensorFlow reports allocator statistics (GPUs) the figure is the
    device's peak allocated bytes; elsewhere it is the bytes of the model's
    and optimizer's variables placed on the device. The logs get one
    `memory_bytes/<device>` entry per device (History, TensorBoard).

    Args:
        print_table: Print the table at the end of training.
    """

    def __init__(self, print_table: bool = True):
        super().__init__()
        self.print_table = print_table
        self.history: dict[str, list[int]] = {}

    def measure(self) -> dict[str, tuple[int, str]]:
        """`{device: (bytes, "peak allocated" or "variables")}` now."""
        by_variables = variable_bytes_by_device(self.model)
        result = {}
        for device, variables in by_variables.items():
            allocated = _allocator_bytes(device)
            if allocated is None:
                result[device] = (variables, "variables")
            else:
                result[device] = (allocated, "peak allocated")
        return result

    def on_epoch_end(self, epoch, logs=None):
        for device, (value, _) in self.measure().items():
            self.history.setdefault(device, []).append(value)
            if logs is not None:
                logs[f"memory_bytes/{device}"] = value

    def on_train_end(self, logs=None):
        if self.print_table:
            print(self.table())

    def table(self) -> str:
        """Devices, what was measured and its value now, as a table."""
        rows = [("device", "measured", "bytes")]
        rows += [(d, kind, f"{value:,}") for d, (value, kind) in self.measure().items()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"
            for r in rows
        )

    def get_config(self) -> dict:
        return {"print_table": self.print_table}
