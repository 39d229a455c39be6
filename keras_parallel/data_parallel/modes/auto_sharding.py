"""`AutoSharding` (`sharding="auto"` with a compression): whole optimizer
state on every device, unless memory requires splitting it.

A compression shrinks the gradients' reduction only. The all-gather of the
updated weight parts that `sharding="optimizer"` adds after each update
carries the weights as they are, so with a compression it can be most of a
step's bytes (`communication_stats()`; docs/reduction.md gives the numbers).
With a compression, "auto" therefore trains as `sharding=None`
(`Replicated`), where the compressed reduction is all a step sends, and
splits the optimizer state (`OptimizerSharded`, as "auto" without a
compression: small weights' state whole on an owner) only when memory
requires it: when the model's trainable weights, their gradients and two optimizer
slots per weight (Adam's) would take more than half the memory TensorFlow
reports for the smallest device (`devices.memory_limit`, a logical GPU's
configured limit; the other half is left to activations). CPUs, and GPUs
without a configured limit, report none, so memory never requires it there:
replicated, each device holds what training on one device holds.

The choice is made once, when the optimizer makes its first slot: the
model's weights exist then, and until then both modes make the same
variables.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_parallel._tf_internal import MirroredVariable
from keras_parallel.data_parallel.modes.base import Mode
from keras_parallel.data_parallel.modes.optimizer_sharded import (
    OptimizerSharded,
)
from keras_parallel.data_parallel.modes.replicated import Replicated
from keras_parallel.devices import memory_limit

# Replicated training state per weight byte: the weight, its gradient and two
# optimizer slots (Adam's; most elementwise optimizers keep one or two).
STATE_PER_WEIGHT_BYTE = 4


def memory_requires_split(weight_bytes: int, limits: Sequence[int | None]) -> bool:
    """Whether replicated training state would not leave half of the
    smallest device memory known free.

    Args:
        weight_bytes: Bytes of the model's trainable weights.
        limits: Each device's memory in bytes, or None where unknown.

    Returns:
        True when `STATE_PER_WEIGHT_BYTE * weight_bytes` exceeds half the
        smallest known limit; False when no limit is known.
    """
    known = [limit for limit in limits if limit is not None]
    return bool(known) and STATE_PER_WEIGHT_BYTE * weight_bytes > min(known) / 2


class AutoSharding(Mode):
    """`Replicated`, or `OptimizerSharded` when memory requires it, chosen at
    the optimizer's first slot."""

    # Both modes it chooses from serve a mesh.
    serves_mesh = True

    def __init__(self):
        self._replicated = Replicated()
        self._sharded = OptimizerSharded.auto()
        self._chosen: Mode | None = None
        self._weight_bytes = 0

    def __repr__(self) -> str:
        return f"AutoSharding({type(self.chosen).__name__})"

    @property
    def chosen(self) -> Mode:
        """The mode training runs in (`Replicated` until the choice)."""
        return self._chosen or self._replicated

    def attach(self, engine) -> None:
        self._replicated.attach(engine)
        self._sharded.attach(engine)

    def create_variable(self, engine, next_creator, kwargs):
        if self._chosen is None and isinstance(
            kwargs.get("colocate_with"), MirroredVariable
        ):
            limits = [memory_limit(device) for device in engine.devices]
            split = memory_requires_split(self._weight_bytes, limits)
            self._chosen = self._sharded if split else self._replicated
        variable = self.chosen.create_variable(engine, next_creator, kwargs)
        if (
            self._chosen is None
            and isinstance(variable, MirroredVariable)
            and variable.trainable
        ):
            self._weight_bytes += variable.shape.num_elements() * variable.dtype.size
        return variable

    def apply(self, engine, apply, grads, variables, optimizer):
        return self.chosen.apply(engine, apply, grads, variables, optimizer)

    def update(self, engine, var, fn, args, kwargs, group):
        return self.chosen.update(engine, var, fn, args, kwargs, group)

    def step(self, engine, models, sizes, training: bool):
        return self.chosen.step(engine, models, sizes, training)

    def replica_loss_weight(self, engine, replica):
        return self.chosen.replica_loss_weight(engine, replica)
