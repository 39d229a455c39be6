"""What DataParallel splits over its replicas: the `sharding` argument.

The stages of ZeRO (Rajbhandari et al., 2020): `"optimizer"` splits the
optimizer state (stage 1), `"gradients"` also leaves each replica with only
its part of the summed gradient (stage 2, a reduce-scatter instead of an
all-reduce), `"parameters"` also the weights (stage 3, gathered where a layer
uses them); None keeps everything whole on every replica.
"""

from __future__ import annotations

import warnings

from keras_parallel.data_parallel.modes.optimizer_sharded import (
    AUTO_MIN_SPLIT_ELEMENTS,
)
from keras_parallel.reduction.compression import Compression

MODES = ("optimizer", "gradients", "parameters", None)

# Modes whose gradients are reduce-scattered: a compression that needs whole
# gradients (PowerSGD's matrices) cannot take part.
SCATTERING = ("gradients", "parameters")


def resolve_sharding(
    sharding: str | None,
    shard_optimizer: bool | None,
    compression: Compression,
) -> str | None:
    """The sharding mode from `DataParallel`'s arguments.

    Args:
        sharding: The `sharding` argument.
        shard_optimizer: The deprecated `shard_optimizer` argument (None when
            not given): True is `"optimizer"`, False is None.
        compression: The resolved compression.

    Returns:
        One of `MODES`.

    Raises:
        ValueError: for an unknown mode, both arguments given, or a
            compression the mode cannot use.
        TypeError: for a `shard_optimizer` that is not a bool.
    """
    if sharding not in MODES:
        raise ValueError(
            f"Unknown `sharding`: {sharding!r}. Allowed: 'auto' (the default: "
            f"'optimizer' with each weight under {AUTO_MIN_SPLIT_ELEMENTS:,} "
            "elements updated whole on "
            "one device, or None with `sync_every` > 1), 'optimizer' (split "
            "the optimizer state by rows), 'gradients' (also reduce-scatter the "
            "gradients), 'parameters' (also split the weights) or None "
            "(everything whole on every device)."
        )
    if shard_optimizer is not None:
        if not isinstance(shard_optimizer, bool):
            raise TypeError(
                "`shard_optimizer` must be True or False. Received: "
                f"shard_optimizer={shard_optimizer!r}"
            )
        if sharding != "optimizer":
            raise ValueError(
                "Pass `sharding` alone: `shard_optimizer` is its deprecated "
                f"form. Received: sharding={sharding!r}, "
                f"shard_optimizer={shard_optimizer!r}"
            )
        replacement = "'optimizer'" if shard_optimizer else "None"
        warnings.warn(
            f"`shard_optimizer={shard_optimizer}` is deprecated; use "
            f"`sharding={replacement}`.",
            DeprecationWarning,
            stacklevel=3,
        )
        sharding = "optimizer" if shard_optimizer else None
    if sharding in SCATTERING and not compression.scatters:
        raise ValueError(
            f"sharding={sharding!r} reduce-scatters gradients, which "
            f"compression={compression!r} cannot do: it compresses whole "
            "gradients for an all-reduce. Use sharding='optimizer' with it, or "
            "compression=None, 'fp16' or 'bf16'."
        )
    return sharding
