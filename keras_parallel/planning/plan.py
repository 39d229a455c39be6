"""`plan`: which strategy fits a model on the devices, before training."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras

from keras_parallel._validation import check_int
from keras_parallel.devices import memory_limit, resolve_devices, short_device
from keras_parallel.planning.candidates import Candidate, candidates
from keras_parallel.planning.profile import measure_profile, one_device_clone
from keras_parallel.planning.state import model_state
from keras_parallel.planning.table import table


@dataclasses.dataclass(frozen=True)
class Plan:
    """The candidate strategies for a model, batch and devices.

    Attributes:
        candidates: Every candidate (`Candidate`), in the table's order.
        skipped: Why candidates were left out (a pipeline of more stages
            than the model has layers to place).
        batch_size: The global batch planned for.
        device_memory: The budget of each device, in bytes.
    """

    candidates: tuple[Candidate, ...]
    skipped: tuple[str, ...]
    batch_size: int
    device_memory: int

    @property
    def best(self) -> Candidate:
        """The cheapest candidate that fits: the least communication per
        step, then the least memory on its fullest device; ties keep the
        table's order."""
        fitting = [c for c in self.candidates if c.fits]
        return min(fitting, key=lambda c: (c.communication, c.largest.total))

    def __str__(self) -> str:
        return table(self)


def plan(
    model: keras.Model,
    batch_size: int,
    devices: str | Sequence[str] | None = None,
    device_memory: int | None = None,
) -> Plan:
    """Estimates, for each strategy that could train `model`, the bytes each
    device holds and sends per step, and picks the cheapest that fits.

    Weights, gradients and optimizer state are counted from the model's
    variables by each strategy's rules; activations are measured from one
    training step traced on a one-device copy of the model at two small
    batches (`keras_parallel.graph_memory`), per layer, and scaled to each
    device's share of `batch_size`. See docs/plan.md for the formulas.

    Args:
        model: A built and compiled Sequential or Functional Keras model
            (compiled with the optimizer and loss it will train with; no
            strategy needed).
        batch_size: The global batch `fit` will use.
        devices: The devices to plan for, as in the strategies: a name or a
            list of names; None means all GPUs, else all logical CPUs.
        device_memory: Bytes each device may hold. None: the memory limit
            of the logical GPUs (`keras_parallel.virtual_devices(...,
            memory_limit_mb=...)`); required on CPUs.

    Returns:
        A `Plan`: `print(plan)` shows the table, `plan.best.strategy()`
        builds the chosen strategy.

    Raises:
        ValueError: for a batch size that is not a positive integer, unknown
            devices, a model that is not built or not compiled, a missing
            `device_memory` on CPUs, or a budget no candidate fits in
            (naming the smallest requirement and its candidate).

    Example:

    ```python
    model = build_model()                        # no strategy yet
    model.compile(optimizer="adam", loss="mse")
    plan = keras_parallel.plan(model, batch_size=256, device_memory=8 * 2**30)
    print(plan)
    with plan.best.strategy().scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=256)
    ```
    """
    check_int("batch_size", batch_size, 1)
    devices = resolve_devices(devices)
    _check_model(model)
    budget = _budget(device_memory, devices)
    clone = one_device_clone(model)
    profile = measure_profile(clone)
    state = model_state(clone)
    found, skipped = candidates(model, state, profile, batch_size, devices, budget)
    result = Plan(tuple(found), tuple(skipped), batch_size, budget)
    if not any(c.fits for c in found):
        least = min(found, key=lambda c: c.largest.total)
        raise ValueError(
            f"No strategy fits device_memory={budget:,} bytes per device with "
            f"batch_size={batch_size} on {len(devices)} devices. The smallest "
            f"requirement is {least.largest.total:,} bytes per device, by "
            f"{least.name}. Give more memory per device, more devices, or a "
            f"smaller batch.\n{result}"
        )
    return result


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: {type(model).__name__}"
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"The model {model.name!r} is not built: its shapes are unknown. "
            "Build it first: give it a `keras.Input`, or call it on a batch "
            "(`model(x[:1])`), or call `model.build(input_shape)`."
        )
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError(
            f"The model {model.name!r} is not compiled. Compile it with the "
            "optimizer and loss it will train with (`model.compile(...)`, no "
            "strategy needed) before planning: its optimizer state and its "
            "loss are part of what each device holds."
        )


def _budget(device_memory, devices) -> int:
    if device_memory is not None:
        return check_int("device_memory", device_memory, 1)
    limits = [memory_limit(d) for d in devices]
    if None in limits:
        raise ValueError(
            "`device_memory` is required: TensorFlow reports no memory size "
            f"for {[short_device(d) for d in devices]} (CPUs share the host's "
            "memory; a GPU reports one when it is split with "
            "keras_parallel.virtual_devices(n, 'GPU', memory_limit_mb=...)). "
            "Pass device_memory=<bytes per device>, e.g. 16 * 2**30."
        )
    return min(limits)
