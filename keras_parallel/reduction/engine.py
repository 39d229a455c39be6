"""`GradientReduction`: the reduction engine as a `tf.distribute.CrossDeviceOps`.

It takes every value of a batch reduction at once, hands the dense ones to a
compression (which fuses them into buckets and sends them through an
all-reduce algorithm), and keeps an account of the bytes of the last step.
Being a CrossDeviceOps, it also plugs into `tf.distribute.MirroredStrategy`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from keras_parallel._tf_internal import (
    Mirrored,
    aggregate_tensors,
    check_destinations,
    divide_by_n,
    gather_to_one_device,
    get_devices_from,
    regroup,
)
from keras_parallel.reduction.algorithms import AllReduceAlgorithm, resolve_algorithm
from keras_parallel.reduction.communicator import Communicator, Transfer
from keras_parallel.reduction.compression import Compression, resolve_compression
from keras_parallel.reduction.states import CompressionStates


def validate_bucket_mb(bucket_mb) -> float | None:
    """Returns `bucket_mb` (None or a float), or raises for a non-positive value."""
    if bucket_mb is None:
        return None
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
        raise TypeError(
            f"`bucket_mb` must be a number. Received: bucket_mb={bucket_mb!r}"
        )
    if not bucket_mb > 0:
        raise ValueError(
            "`bucket_mb` must be > 0 (megabytes per fused bucket, e.g. 25). "
            f"Received: bucket_mb={bucket_mb!r}"
        )
    return float(bucket_mb)


class GradientReduction(tf.distribute.CrossDeviceOps):
    """Bucketed, optionally compressed all-reduce.

    Args:
        reduction: `"auto"` (NCCL between GPUs where TensorFlow has it, else
            in-process), `"in_process"`, `"nccl"`, or an `AllReduceAlgorithm`.
        bucket_mb: Gradients are fused into buckets of at most this many
            megabytes (2**20 bytes) before they are reduced. None: the
            algorithm's default (0.25 in-process, 25 for NCCL).
        compression: None, `"fp16"`, `"bf16"`, or a `Compression` such as
            `keras_parallel.PowerSGD(rank=4)`.
        devices: The devices, to check `reduction` against now; without them
            `"auto"` is resolved at the first reduction.
        fallback: Reduces what the engine does not take (sparse or integer
            values, results wanted on other devices). None: each destination
            copies and adds the parts itself, which suits one machine.
        groups: Replica indices that sum among themselves, one list per
            group (each replica in one); None: all replicas together. A
            device mesh sums each weight shard's gradient over its batch
            group only.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy(
        cross_device_ops=keras_parallel.reduction.GradientReduction(
            bucket_mb=4, compression="bf16"
        )
    )
    ```
    """

    def __init__(
        self,
        reduction: str | AllReduceAlgorithm = "auto",
        bucket_mb: float | None = None,
        compression: str | Compression | None = None,
        devices: Sequence[str] | None = None,
        fallback: tf.distribute.CrossDeviceOps | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        self._fallback = fallback
        self._groups = None if groups is None else [list(g) for g in groups]
        self._reduction = reduction
        self._algorithm = (
            resolve_algorithm(reduction, devices)
            if devices or isinstance(reduction, AllReduceAlgorithm)
            else None
        )
        if self._algorithm is None:
            resolve_algorithm(reduction, [])  # validates the name
        self._bucket_mb = validate_bucket_mb(bucket_mb)
        self.compression = resolve_compression(compression)
        self.states = CompressionStates(self.compression)
        self._last_step: list[Transfer] = []
        self._last_fp32_bytes = 0

    @property
    def _num_between_graph_workers(self) -> int:
        # Read by CrossDeviceOps.reduce/batch_reduce, which skip the reduction
        # of a single local part only when no other process holds parts.
        return self._algorithm.num_workers if self._algorithm else 1

    @property
    def algorithm(self) -> AllReduceAlgorithm | None:
        """The all-reduce algorithm (None until resolved)."""
        return self._algorithm

    def reduce_implementation(
        self, reduce_op, per_replica_value, destinations, options
    ):
        return self.batch_reduce_implementation(
            reduce_op, [(per_replica_value, destinations)], options
        )[0]

    def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
        results = [None] * len(value_destination_pairs)
        dense, other = [], []
        for index, (value, destinations) in enumerate(value_destination_pairs):
            parts = list(value.values)
            if _is_dense(parts) and _devices(destinations, value) == [
                p.device for p in parts
            ]:
                dense.append(index)
            else:
                other.append(index)
        if other and self._fallback is not None:
            reduced = self._fallback.batch_reduce_implementation(
                reduce_op, [value_destination_pairs[i] for i in other], options
            )
            for index, value in zip(other, reduced, strict=True):
                results[index] = value
        elif other:
            for index in other:
                value, destinations = value_destination_pairs[index]
                parts = list(value.values)
                devices = _devices(destinations, value)
                if devices == [p.device for p in parts]:
                    sums = self._in_groups([parts], _sum_where_they_are)[0]
                else:
                    sums = _copy_and_sum(parts, devices)
                results[index] = self._regroup(reduce_op, sums, self._group_size(parts))
        if dense:
            sums = self._reduce_dense(
                [value_destination_pairs[i][0].values for i in dense]
            )
            replicas = self._group_size(sums[0]) * self._algorithm.num_workers
            for index, parts in zip(dense, sums, strict=True):
                results[index] = self._regroup(reduce_op, parts, replicas)
        return results

    def _group_size(self, parts) -> int:
        return len(parts) if self._groups is None else len(self._groups[0])

    def _in_groups(self, values, reduce_group):
        """`reduce_group(parts, group_index)` applied to each group's parts
        of `values` (`values[k][replica]`), put back in replica order."""
        if self._groups is None:
            return reduce_group(values, 0)
        results = [[None] * len(parts) for parts in values]
        for index, group in enumerate(self._groups):
            with tf.name_scope(f"reduction_group_{index}"):
                sums = reduce_group(
                    [[parts[r] for r in group] for parts in values], index
                )
            for k, summed in enumerate(sums):
                for r, part in zip(group, summed, strict=True):
                    results[k][r] = part
        return results

    @staticmethod
    def _regroup(reduce_op, parts, num_replicas):
        if reduce_op == tf.distribute.ReduceOp.MEAN:
            parts = [divide_by_n(p, num_replicas) for p in parts]
        return regroup(parts, wrap_class=Mirrored)

    def _reduce_dense(self, gradients):
        if self._algorithm is None:
            self._algorithm = resolve_algorithm(
                self._reduction, [p.device for p in gradients[0]]
            )
        bucket_mb = self._bucket_mb or self._algorithm.default_bucket_mb
        transfers = []

        def reduce_group(group, index):
            if len(group[0]) * self._algorithm.num_workers == 1:
                return group  # a group of one device: nothing to send
            communicator = Communicator(
                self._algorithm, int(bucket_mb * 2**20), len(group[0])
            )
            state = self.states.current(index)
            sums = self.compression.reduce(group, communicator, state)
            # Every group sends the same; the account is per replica.
            transfers[:] = communicator.transfers
            return sums

        sums = self._in_groups([list(parts) for parts in gradients], reduce_group)
        self._last_step = transfers
        self._last_fp32_bytes = sum(
            4 * parts[0].shape.num_elements() for parts in gradients
        )
        return sums

    def _gather_implementation(self, per_replica_value, destinations, axis, options):
        return gather_to_one_device(per_replica_value, destinations, axis, options)

    def communication_stats(self) -> dict:
        """What the last traced reduction of dense values sends, per replica.

        Returns:
            A dict with `bytes_per_step` (bytes each replica contributes in a
            step once compression runs), `fp32_bytes_per_step` (the same
            gradients as plain float32), `warmup_bytes_per_step` (steps before
            compression starts; equal to `bytes_per_step` without warm-up),
            `reductions` (all-reduces per step), `reduction`, `compression`
            and `buckets` (one dict per transfer: label, tensors, elements,
            dtype, bytes, phase).
        """
        every = [t for t in self._last_step if t.phase == "every step"]
        compressed = [t for t in self._last_step if t.phase == "compressed"]
        warmup = [t for t in self._last_step if t.phase == "warmup"] or compressed
        steady = every + compressed
        return {
            "bytes_per_step": sum(t.bytes for t in steady),
            "fp32_bytes_per_step": self._last_fp32_bytes,
            "warmup_bytes_per_step": sum(t.bytes for t in every + warmup),
            "reductions": len(steady),
            "reduction": self._algorithm.name if self._algorithm else self._reduction,
            "compression": self.compression.name,
            "buckets": [vars(t) for t in self._last_step],
        }


def _is_dense(parts) -> bool:
    return all(
        isinstance(p, tf.Tensor) and p.shape.is_fully_defined() and p.dtype.is_floating
        for p in parts
    )


def _devices(destinations, value) -> list[str]:
    if check_destinations(destinations):
        return list(get_devices_from(destinations))
    return list(get_devices_from(value))


def _sum_where_they_are(values, _) -> list:
    return [_copy_and_sum(parts, [p.device for p in parts]) for parts in values]


def _copy_and_sum(parts, devices) -> list:
    """Sums parts on each destination: for IndexedSlices (concatenated),
    integers, and results wanted on other devices than the parts'."""
    sums = []
    for device in devices:
        with tf.device(device):
            sums.append(aggregate_tensors(parts))
    return sums
