"""`UncompressedGathers`: the warning that a sharding mode chosen with a
compression sends weights uncompressed."""

from __future__ import annotations

import tensorflow as tf

from keras_parallel.reduction.account import REDUCTIONS


class UncompressedGathers:
    """Warns once, after the first traced training step, how many bytes the
    all-gathers (and broadcasts) of weights that `sharding` adds put into
    collectives next to the compressed reduction, and how to avoid them.

    Args:
        sharding: The `sharding` argument the user gave.
        compression: The compression.
    """

    def __init__(self, sharding: str, compression):
        self._sharding = sharding
        self._compression = compression
        self._warned = False

    def after_step(self, engine) -> None:
        """Warns, once, from the account of the step just traced."""
        if self._warned:
            return
        account = engine.gradient_reduction.account
        steady = [t for t in account.current if t.phase != "warmup"]
        n = account.replicas
        reduced = sum(t.put_in(n) for t in steady if t.kind in REDUCTIONS)
        moved = sum(t.put_in(n) for t in steady if t.kind not in REDUCTIONS)
        if not moved:
            return
        self._warned = True
        strategy = type(engine.container_strategy()).__name__
        tf.get_logger().warning(
            "%s(sharding=%r, compression=%s): the compression shrinks the "
            "gradients' reduction to %s bytes per step and replica, but the "
            "weights that sharding=%r gathers into every device's copy travel "
            "uncompressed: %s bytes more (%.0f%% of the step's %s). "
            "Pass sharding=None to send only the compressed reduction (each "
            "device then keeps the whole optimizer state); the default "
            "sharding='auto' does so with a compression unless the devices' "
            "memory requires splitting.",
            strategy,
            self._sharding,
            self._compression,
            f"{reduced:,.0f}",
            self._sharding,
            f"{moved:,.0f}",
            100 * moved / (moved + reduced),
            f"{moved + reduced:,.0f}",
        )
