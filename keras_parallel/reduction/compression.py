"""Gradient compressions: how gradients travel during the all-reduce.

Like PyTorch DDP's communication hooks, a compression is an object that
receives all gradients of a step and a `Communicator`, and returns their sums.
What it keeps between steps (PowerSGD's error memory) is a separate
`CompressionState`, one per strategy and optimizer, made by `new_state`: one
compression object may serve several strategies and models.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from keras_parallel.reduction.communicator import Communicator

# Sums one per-replica state (a variable on each of this process's replicas).
Total = Callable[[list[tf.Variable]], np.ndarray]


class CompressionState(abc.ABC):
    """What a compression keeps between the steps of one optimizer.

    Checkpoints hold it as named arrays that do not depend on the number of
    replicas, so that it can be restored on another device count.
    """

    @abc.abstractmethod
    def arrays(self, total: Total | None = None) -> dict[str, np.ndarray]:
        """The state as named arrays, to be saved.

        Args:
            total: Sums a state kept per replica over the replicas: by
                default this process's, or every worker's when all of them
                save at once (see `collective_saves`).
        """

    @abc.abstractmethod
    def restore(self, arrays: Mapping[str, np.ndarray], workers: int = 1) -> None:
        """Takes the state from `arrays` (as returned by `arrays()`), now or,
        when its variables do not exist yet, when they are made.

        Args:
            arrays: The saved state.
            workers: Workers training now; a sum saved over every worker's
                replicas is shared among all their replicas.
        """


class Compression(abc.ABC):
    """Sums each gradient across replicas, choosing what goes on the wire."""

    name: str

    def new_state(self) -> CompressionState | None:
        """A fresh state for one optimizer of one strategy (None: stateless)."""
        return None

    @abc.abstractmethod
    def reduce(
        self,
        gradients: Sequence[Sequence[tf.Tensor]],
        communicator: Communicator,
        state: CompressionState | None = None,
    ) -> list[list[tf.Tensor]]:
        """Sums gradients across replicas.

        Args:
            gradients: `gradients[k][i]` is replica i's part of gradient k.
            communicator: Moves tensors and accounts for the bytes.
            state: What `new_state()` made for the optimizer these gradients
                are for.

        Returns:
            `result[k][i]`: the (approximate) sum of gradient k on replica i's
            device.
        """

    def reduce_scatter(
        self,
        gradients: Sequence[Sequence[tf.Tensor]],
        communicator: Communicator,
        state: CompressionState | None = None,
    ) -> list[list[tf.Tensor]]:
        """Sums gradients across replicas, leaving each replica only its rows
        of each sum (`rows.row_parts`). Only compressions whose `scatters` is
        True implement it.

        Args:
            gradients: `gradients[k][i]` is replica i's part of gradient k.
            communicator: Moves tensors and accounts for the bytes.
            state: As in `reduce`.

        Returns:
            `result[k][r]`: replica r's rows of the sum of gradient k, on its
            device.
        """
        raise NotImplementedError(
            f"The {self.name!r} compression cannot reduce-scatter: it needs "
            "whole gradients."
        )

    # Whether `reduce_scatter` is implemented.
    scatters: bool = False

    def __repr__(self) -> str:
        return self.name


class NoCompression(Compression):
    """Gradients travel in their own dtype, fused into buckets."""

    name = "none"

    scatters = True

    def reduce(self, gradients, communicator, state=None):
        return communicator.bucketed_sum(gradients)

    def reduce_scatter(self, gradients, communicator, state=None):
        return communicator.bucketed_reduce_scatter(gradients)


class HalfPrecision(Compression):
    """Gradients travel and are added as float16 or bfloat16, as PyTorch's
    `fp16_compress_hook` does with NCCL; the sums return in float32.

    float16 keeps 10 bits of mantissa but overflows past 65504, so each bucket
    is scaled by a power of two chosen from the replicas' largest magnitudes
    (one extra scalar per bucket); bfloat16 has float32's range and 7 bits.

    Args:
        dtype: `"float16"` or `"bfloat16"`.
    """

    def __init__(self, dtype: str):
        self.dtype = tf.as_dtype(dtype)
        self.name = {"float16": "fp16", "bfloat16": "bf16"}[self.dtype.name]

    scatters = True

    def reduce(self, gradients, communicator, state=None):
        return communicator.bucketed_sum(gradients, wire_dtype=self.dtype)

    def reduce_scatter(self, gradients, communicator, state=None):
        return communicator.bucketed_reduce_scatter(gradients, wire_dtype=self.dtype)


NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def resolve_compression(compression) -> Compression:
    """A `Compression` for `DataParallel(compression=...)`.

    Raises:
        ValueError: for an unknown name.
        TypeError: for anything else that is not a `Compression`.
    """
    if compression is None:
        return NoCompression()
    if isinstance(compression, Compression):
        return compression
    if isinstance(compression, str):
        if compression not in NAMES:
            raise ValueError(
                f"Unknown `compression`: {compression!r}. Allowed: None, 'fp16', "
                "'bf16', or keras_parallel.PowerSGD(rank=...)."
            )
        return HalfPrecision(NAMES[compression])
    raise TypeError(
        "`compression` must be None, 'fp16', 'bf16' or a "
        f"keras_parallel.reduction.Compression such as PowerSGD(rank=4). Received: "
        f"compression={compression!r}"
    )
