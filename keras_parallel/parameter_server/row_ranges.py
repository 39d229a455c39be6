"""Which weights a `variable_partitioner` splits, and where their row
ranges go.

The partitioner is TensorFlow ParameterServerStrategy's: a callable
`partitioner(shape, dtype)` returning the number of partitions along each
axis. Weights are split along their first axis only (an Embedding's rows), in
ranges as TensorFlow splits them, each range on a different ps task when
there are enough, the least loaded in bytes first. An optimizer slot of a
split weight is split alike, on the same ps tasks.
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from keras_parallel.parameter_server.partitioned import PartitionedVariable
from keras_parallel.parameter_server.variables import BytePlacer

# The shape a partitioner is tried on when the strategy is made, so that a
# wrong one fails there rather than at the first large weight.
_PROBE_SHAPE = (1024, 64)
_ALLOWED = (
    "a callable `partitioner(shape, dtype)` returning the number of "
    "partitions per axis, all 1 but the first (as TensorFlow's "
    "ParameterServerStrategy takes), e.g. "
    "tf.distribute.experimental.partitioners.MinSizePartitioner(), "
    "FixedShardsPartitioner(2) or MaxSizePartitioner(...)"
)


def check_partitioner(partitioner) -> None:
    """Raises a clear error unless `partitioner` is None or a partitioner
    that gives a valid answer for a typical weight.

    Raises:
        TypeError: not callable, or not callable as `(shape=, dtype=)`.
        ValueError: its answer is not a list of partitions per axis.
    """
    if partitioner is None:
        return
    if not callable(partitioner):
        raise TypeError(
            f"`variable_partitioner` must be None or {_ALLOWED}. Received: "
            f"variable_partitioner={partitioner!r}"
        )
    row_count(partitioner, tf.TensorShape(_PROBE_SHAPE), tf.float32)


def row_count(partitioner, shape: tf.TensorShape, dtype) -> int:
    """Into how many row ranges `partitioner` splits a weight of `shape`
    (1: not split), its answer checked."""
    try:
        answer = partitioner(shape=shape, dtype=tf.as_dtype(dtype))
    except TypeError as error:
        raise TypeError(
            f"`variable_partitioner` must be {_ALLOWED}. Calling "
            f"variable_partitioner(shape={shape}, dtype={dtype.name}) failed: "
            f"{error}"
        ) from error
    valid = (
        isinstance(answer, (list, tuple))
        and len(answer) == shape.rank
        and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in answer
        )
        and all(n >= 1 for n in answer)
    )
    if not valid:
        raise ValueError(
            f"`variable_partitioner` must return a list of {shape.rank} "
            "positive integers, the number of partitions along each axis of "
            f"the weight. For shape={shape} it returned {answer!r}."
        )
    if any(n != 1 for n in answer[1:]):
        raise ValueError(
            "ParameterServer partitions weights along their first axis only "
            "(rows, as an Embedding's table), so `variable_partitioner` must "
            f"return 1 for every other axis. For shape={shape} it returned "
            f"{list(answer)}."
        )
    return min(int(answer[0]), shape[0])


def row_offsets(rows: int, count: int) -> list[int]:
    """Where each of `count` row ranges starts (and the last ends), the
    first ones a row longer when `count` does not divide `rows`, as
    TensorFlow's ParameterServerStrategy splits."""
    base, extra = divmod(rows, count)
    sizes = [base + (k < extra) for k in range(count)]
    return [0, *np.cumsum(sizes).tolist()]


def row_ranges(
    partitioner, placer: BytePlacer, value: tf.Tensor, colocate_with=None
) -> list[tuple[str, int, int]]:
    """The (device, first row, end row) of each row range a new weight of
    `value` is cut into, or [] to keep it whole.

    Args:
        partitioner: the strategy's `variable_partitioner`, or None.
        placer: the ps devices and the bytes each holds (updated).
        value: the weight's initial value.
        colocate_with: the variable an optimizer slot is made for, or None.

    Returns:
        A list of (device, start, stop), one per range, in row order.
    """
    if isinstance(colocate_with, PartitionedVariable):
        if value.shape != colocate_with.full_shape:
            return []
        offsets = colocate_with.offsets
        devices = [part.device for part in colocate_with.shards]
    elif colocate_with is not None or partitioner is None or value.shape.rank == 0:
        return []
    else:
        count = row_count(partitioner, value.shape, value.dtype)
        if count <= 1:
            return []
        offsets = row_offsets(value.shape[0], count)
        row_bytes = value.dtype.size * value.shape[1:].num_elements()
        devices = []
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            devices.append(
                placer.place_bytes((stop - start) * row_bytes, avoid=devices)
            )
    return list(zip(devices, offsets[:-1], offsets[1:], strict=True))
