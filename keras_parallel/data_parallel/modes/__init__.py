"""The ways DataParallel trains, one policy object each (`base.Mode`).

| mode | chosen by | module |
|---|---|---|
| `Replicated` | `sharding=None` | `replicated.py` |
| `OptimizerSharded` | `"optimizer"`; `"auto"` uncompressed | `optimizer_sharded.py` |
| `AutoSharding` | `"auto"` (the default) with a compression | `auto_sharding.py` |
| `GradientSharded` | `sharding="gradients"` | `gradient_sharded.py` |
| `ParameterSharded` | `sharding="parameters"` | `parameter_sharded.py` |
| `LocalSGD` | `sync_every` > 1 | `local_sgd.py` |

Local gradient accumulation (`local_accumulation.py`) composes with the
synchronous modes.
"""

from __future__ import annotations

from keras_parallel._validation import check_int
from keras_parallel.data_parallel.modes.auto_sharding import AutoSharding
from keras_parallel.data_parallel.modes.base import Mode
from keras_parallel.data_parallel.modes.gather_warning import UncompressedGathers
from keras_parallel.data_parallel.modes.gradient_sharded import GradientSharded
from keras_parallel.data_parallel.modes.local_sgd import LocalSGD
from keras_parallel.data_parallel.modes.optimizer_sharded import OptimizerSharded
from keras_parallel.data_parallel.modes.parameter_sharded import ParameterSharded
from keras_parallel.data_parallel.modes.replicated import Replicated
from keras_parallel.data_parallel.modes.sharding_argument import resolve_sharding
from keras_parallel.data_parallel.periodic_averaging import outer_maker
from keras_parallel.reduction.compression import Compression, NoCompression

_SHARDED = {
    "optimizer": OptimizerSharded,
    "gradients": GradientSharded,
    "parameters": ParameterSharded,
}


def choose_mode(
    *,
    sharding: str | None,
    shard_optimizer: bool | None,
    compression: Compression,
    sync_every: int,
    outer_optimizer,
    sync_batch_norm: bool | None,
) -> tuple[Mode, bool]:
    """The mode `DataParallel`'s arguments ask for, and whether it
    synchronizes BatchNormalization.

    Args:
        sharding: The `sharding` argument. `"auto"`: `"optimizer"` with
            each weight under `AUTO_MIN_SPLIT_ELEMENTS` owned whole; with a
            compression, None unless memory requires that (`AutoSharding`),
            as the all-gather that `"optimizer"` adds is not compressed; None
            with `sync_every` > 1.
        shard_optimizer: The deprecated `shard_optimizer` argument.
        compression: The resolved compression.
        sync_every: The `sync_every` argument.
        outer_optimizer: The `outer_optimizer` argument.
        sync_batch_norm: The `sync_batch_norm` argument (None: the mode's
            default).

    Returns:
        (the mode, `sync_batch_norm`).

    Raises:
        ValueError: for values out of range or that do not combine.
        TypeError: for arguments of the wrong type.
    """
    check_int("sync_every", sync_every, 1)
    make_outer = outer_maker(outer_optimizer)
    if sync_batch_norm is not None and not isinstance(sync_batch_norm, bool):
        raise TypeError(
            "`sync_batch_norm` must be True or False. Received: "
            f"sync_batch_norm={sync_batch_norm!r}. Leave it unset for the "
            "default: True, or False with `sync_every` > 1."
        )
    if sync_every == 1:
        if outer_optimizer is not None:
            raise ValueError(
                "`outer_optimizer` is applied when the replicas synchronize "
                "after training alone, so it needs `sync_every` > 1. Received: "
                f"sync_every=1, outer_optimizer={outer_optimizer!r}. Pass "
                "`sync_every=H` (e.g. 8), or drop `outer_optimizer`."
            )
        chosen = sharding != "auto" or shard_optimizer is not None
        sharding = resolve_sharding(
            "optimizer" if sharding == "auto" else sharding,
            shard_optimizer,
            compression,
        )
        compresses = not isinstance(compression, NoCompression)
        if compresses and not chosen:
            mode = AutoSharding()
        elif not chosen:
            mode = OptimizerSharded.auto()
        elif sharding is None:
            mode = Replicated()
        else:
            mode = _SHARDED[sharding](
                UncompressedGathers(sharding, compression) if compresses else None
            )
    else:
        _check_local_sgd(sync_every, sharding, sync_batch_norm)
        resolve_sharding(
            None if sharding == "auto" else sharding, shard_optimizer, compression
        )
        mode = LocalSGD(sync_every, make_outer)
    if sync_batch_norm is None:
        sync_batch_norm = mode.syncs_batch_norm
    return mode, sync_batch_norm


def _check_local_sgd(sync_every, sharding, sync_batch_norm) -> None:
    if sharding in _SHARDED:
        raise ValueError(
            f"sync_every={sync_every} gives every replica its own weights and "
            "whole optimizer state between synchronizations, so nothing can be "
            f"split over the devices. Received: sharding={sharding!r}. Leave "
            "`sharding` unset (or None) with `sync_every` > 1."
        )
    if sync_batch_norm:
        raise ValueError(
            "sync_batch_norm=True exchanges BatchNormalization statistics every "
            f"step, which sync_every={sync_every} is meant to avoid: between "
            "synchronizations each replica normalises with its own batch, and "
            "the moving statistics are averaged when the replicas meet. Leave "
            "`sync_batch_norm` unset (or False) with `sync_every` > 1."
        )


__all__ = ["Mode", "choose_mode"]
