"""`GradientReduction`: the reduction engine as a `tf.distribute.CrossDeviceOps`.

It takes every value of a batch reduction at once, hands the dense ones to a
compression (which fuses them into buckets and sends them through an
all-reduce algorithm), gathers the weight parts of the sharding modes, and
keeps an account of every collective of the last step (`account.py`).
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
from keras_parallel.reduction.account import StepAccount
from keras_parallel.reduction.algorithms import AllReduceAlgorithm, resolve_algorithm
from keras_parallel.reduction.communicator import Communicator, Transfer
from keras_parallel.reduction.compression import Compression, resolve_compression
from keras_parallel.reduction.rows import join_rows, num_rows, row_part, row_parts
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
        self.account = StepAccount()

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
            if is_dense(parts) and _devices(destinations, value) == [
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

    def reduce_scatter(
        self, values: Sequence[tf.distribute.DistributedValues]
    ) -> list[list[tf.Tensor]]:
        """Sums dense per-replica values and leaves each replica with its rows
        of each sum (`rows.row_parts`), through the compression's
        reduce-scatter: a replica receives 1/N of what an all-reduce gives it.

        Args:
            values: Per-replica values (float, static shapes, one part per
                replica on its device).

        Returns:
            `result[k][r]`: replica r's rows of the sum of `values[k]`, on its
            device.
        """
        return self._reduce_dense([local_parts(v) for v in values], scatter=True)

    def reduce_scatter_one(self, value, shape: tf.TensorShape) -> list:
        """`reduce_scatter` of one per-replica value of a variable of `shape`;
        a sparse gradient (`tf.IndexedSlices`) stays sparse: each replica
        receives every replica's entries of its rows, re-indexed (not counted
        in `communication_stats`, whose buffers are dense)."""
        parts = local_parts(value)
        if is_dense(parts):
            return self.reduce_scatter([value])[0]
        n = len(parts)
        if self._num_between_graph_workers > 1:
            # TensorFlow's collectives gather every worker's entries to each
            # local replica, which keeps those of its rows.
            summed = local_parts(
                self._fallback.batch_reduce(
                    tf.distribute.ReduceOp.SUM, [(value, value)]
                )[0]
            )
            rows = []
            for r, total in enumerate(summed):
                with tf.device(total.device):
                    whole = tf.IndexedSlices(*_sparse(total, shape))
                    rows.append(row_part(whole, n, r))
            return rows
        cut = []
        for part in parts:
            with tf.device(part.device):
                cut.append(row_parts(tf.IndexedSlices(*_sparse(part, shape)), n))
        results = []
        for r, destination in enumerate(parts):
            with tf.device(destination.device):
                pieces = [rows[r] for rows in cut]
                results.append(
                    tf.IndexedSlices(
                        tf.concat([p.values for p in pieces], axis=0),
                        tf.concat([p.indices for p in pieces], axis=0),
                        pieces[0].dense_shape,
                    )
                )
        return results

    def all_gather_rows(self, parts, shape: tf.TensorShape, label: str) -> list:
        """Every replica's copy of the value of `shape` whose row parts
        (`rows.row_parts`) are `parts`, one per replica on its device; counted
        as an all-gather of the step."""
        self.count_all_gather(parts[0], len(parts), label)
        wholes = []
        for part in parts:
            with tf.device(part.device):
                wholes.append(join_rows(parts, shape))
        return wholes

    def count_all_gather(self, part, num_parts: int, label: str) -> None:
        """Counts an all-gather of `num_parts` parts like `part` (a tensor or
        variable); one part, on one device, moves nothing."""
        if num_parts > 1:
            self._count(part, label, "all_gather")

    def count_broadcast(self, value, num_copies: int, label: str) -> None:
        """Counts `value` (a tensor or variable) sent by one replica to the
        others of `num_copies`."""
        if num_copies > 1:
            self._count(value, label, "broadcast")

    def _count(self, value, label, kind) -> None:
        elements = value.shape.num_elements()
        dtype = tf.as_dtype(value.dtype)
        self.account.record(
            [Transfer(label, 1, elements, dtype.name, elements * dtype.size, kind=kind)]
        )

    def _reduce_dense(self, gradients, scatter=False):
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
            collective = (
                self.compression.reduce_scatter if scatter else self.compression.reduce
            )
            sums = collective(group, communicator, state)
            # Every group sends the same; the account is per replica.
            transfers[:] = communicator.transfers
            return sums

        sums = self._in_groups([list(parts) for parts in gradients], reduce_group)
        group = self._group_size(gradients[0])
        self.account.record(
            transfers,
            uncompressed=sum(
                _uncompressed_bytes(parts[0], group if scatter else 1)
                for parts in gradients
            ),
            replicas=group * self._algorithm.num_workers,
        )
        return sums

    def recording_step(self):
        """A context collecting every collective recorded while a step is
        traced (reductions, reduce-scatters, gathers, broadcasts): they become
        the last step's if the step summed anything (`StepAccount`)."""
        return self.account.recording_step()

    def _gather_implementation(self, per_replica_value, destinations, axis, options):
        return gather_to_one_device(per_replica_value, destinations, axis, options)

    def communication_stats(self) -> dict:
        """Bytes each replica puts into every collective of the last traced
        training step, not only the gradients' (per step;
        `DataParallel.communication_stats()` averages them over an update).

        Returns:
            A dict. `bytes_per_step`: the total, the sum of
            `all_reduce_bytes_per_step` and `reduce_scatter_bytes_per_step`
            (sums of the gradients, or of a meeting's weight changes, as
            compressed: a replica's buffer), `all_gather_bytes_per_step`
            (weight parts: a replica's part) and `broadcast_bytes_per_step`
            (weights an owner device sends: 1/N per replica); gathers and
            broadcasts are never compressed. `ring_bytes_per_step`: what a
            replica sends when each collective runs as a ring.
            `uncompressed_bytes_per_step` (former name `fp32_bytes_per_step`):
            the total with `compression=None`; `compression_ratio`: the total
            over it. `warmup_bytes_per_step`: the total before compression
            starts. `reductions`: sums per step. `reduction`, `compression`:
            names. `buckets`: one dict per collective (`Transfer`'s fields).
        """
        return {
            **self.account.stats(),
            "reduction": self._algorithm.name if self._algorithm else self._reduction,
            "compression": self.compression.name,
            "buckets": self.account.buckets,
        }


def _uncompressed_bytes(gradient, num_parts: int) -> int:
    """Bytes a replica puts into a reduction of `gradient` with
    `compression=None`: the gradient, or, reduce-scattered into `num_parts`
    row parts, the parts with their zero rows (`rows.row_parts`)."""
    shape = gradient.shape
    rows = num_rows(shape)
    if not rows:
        return 0
    padded = -(-rows // num_parts) * num_parts
    return shape.num_elements() // rows * padded * gradient.dtype.size


def local_parts(value) -> list:
    """This process's parts of a per-replica value (a tensor with one local
    replica)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return list(value.values)
    return [value]


def _sparse(value, shape):
    """(values, indices, dense_shape) of a gradient for a variable of `shape`,
    the dense shape static."""
    if isinstance(value, tf.IndexedSlices):
        dense_shape = tf.constant(shape.as_list(), value.dense_shape.dtype)
        return value.values, value.indices, dense_shape
    dense = tf.convert_to_tensor(value)
    return dense, tf.range(shape[0]), tf.constant(shape.as_list(), tf.int64)


def is_dense(parts) -> bool:
    """Whether per-replica `parts` are float tensors of static shape."""
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
