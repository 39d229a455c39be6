"""What a compression uses to move tensors: sums through an all-reduce
algorithm (whole, or reduce-scattered by rows), bucketing, and an account of
the bytes each replica sends."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Sequence

import tensorflow as tf

from keras_parallel.reduction import buckets
from keras_parallel.reduction.algorithms import AllReduceAlgorithm
from keras_parallel.reduction.rows import row_parts

# Characters a name scope may not hold (a label is free text).
_SCOPE_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")

# Largest magnitude a float16 part may reach before the sum: 2**15 leaves
# headroom below float16's maximum, 65504.
FLOAT16_SAFE_MAX = 2.0**15


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One collective of one step, as one replica sees it.

    Attributes:
        label: What was sent (`"bucket 0"`, `"powersgd P"`, a weight's name).
        tensors: How many gradients or weights it carries.
        elements: Elements each replica puts in: its buffer for an
            all-reduce or reduce-scatter, its part for an all-gather; for a
            broadcast, the value its one sender puts in.
        dtype: Dtype on the wire.
        bytes: Bytes of those elements.
        phase: When it is sent: `"every step"`, or only `"warmup"` steps
            (before compression starts) or only `"compressed"` steps.
        kind: `"all_reduce"`, `"reduce_scatter"`, `"all_gather"` or
            `"broadcast"`.
    """

    label: str
    tensors: int
    elements: int
    dtype: str
    bytes: int
    phase: str = "every step"
    kind: str = "all_reduce"

    def put_in(self, num_replicas: int) -> float:
        """Bytes one of `num_replicas` replicas puts into the collective, on
        average: `bytes`, or a broadcast's 1/N of it (one replica sends)."""
        return self.bytes / num_replicas if self.kind == "broadcast" else self.bytes

    def ring_bytes(self, num_replicas: int) -> float:
        """Bytes one of `num_replicas` replicas sends, on average, when the
        collective runs as a ring: 2(N-1)/N of the buffer for an all-reduce,
        (N-1)/N for a reduce-scatter, N-1 parts for an all-gather, (N-1)/N of
        the value for a broadcast."""
        share = (num_replicas - 1) / num_replicas
        if self.kind == "all_gather":
            return (num_replicas - 1) * self.bytes
        return (2 if self.kind == "all_reduce" else 1) * share * self.bytes


class Communicator:
    """Sums per-device tensors for a compression and records each transfer.

    Args:
        algorithm: The all-reduce algorithm.
        bucket_bytes: Bucket capacity for `bucketed_sum`.
        num_replicas: Number of this process's devices taking part (the
            parts each sum is given).
    """

    def __init__(
        self, algorithm: AllReduceAlgorithm, bucket_bytes: int, num_replicas: int
    ):
        self.algorithm = algorithm
        self.bucket_bytes = bucket_bytes
        self.num_replicas = num_replicas
        self.transfers: list[Transfer] = []
        self._phase = "every step"

    @property
    def num_replicas_in_sync(self) -> int:
        """Replicas of every worker whose parts each sum adds up."""
        return self.num_replicas * self.algorithm.num_workers

    @contextlib.contextmanager
    def phase(self, name: str):
        """Tags the transfers recorded inside the block with `name`."""
        outer, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = outer

    def sum(
        self,
        parts: Sequence[tf.Tensor],
        label: str,
        tensors: int = 1,
    ) -> list[tf.Tensor]:
        """All-reduces one tensor per device and records the transfer."""
        self._record(parts[0], label, tensors, "all_reduce")
        return self.algorithm.all_reduce(parts)

    def scatter_sum(
        self, flats: Sequence[tf.Tensor], label: str, tensors: int = 1
    ) -> list[tf.Tensor]:
        """Reduce-scatters one flat tensor per device (chunk r of the sum to
        device r) and records the transfer."""
        kind = "reduce_scatter" if self.algorithm.scatters_natively else "all_reduce"
        self._record(flats[0], label, tensors, kind)
        return self.algorithm.reduce_scatter(flats)

    def _record(self, buffer, label, tensors, kind):
        elements = buffer.shape.num_elements()
        self.transfers.append(
            Transfer(
                label,
                tensors,
                elements,
                buffer.dtype.name,
                elements * buffer.dtype.size,
                self._phase,
                kind,
            )
        )

    def bucketed_sum(
        self,
        gradients: Sequence[Sequence[tf.Tensor]],
        wire_dtype: tf.DType | None = None,
        label: str = "bucket",
    ) -> list[list[tf.Tensor]]:
        """Sums gradients in buckets, optionally sent in a narrower dtype.

        Args:
            gradients: `gradients[k][i]` is replica i's part of gradient k.
            wire_dtype: Dtype to send and add in, as NCCL and TensorFlow's
                collectives add (so the sums are the same in one process and
                across workers); the sum returns in the gradient's dtype.
                float16 parts are scaled by a power of two so that neither a
                part nor the sum overflows and small values keep their bits.
            label: Prefix of the transfers' labels.

        Returns:
            `result[k][i]`: the sum of gradient k on replica i's device.
        """
        return self._in_buckets(
            gradients,
            label,
            lambda parts: (buckets.pack(parts), parts),
            lambda flats, name, tensors, dtype: self._sum_flat(
                flats, name, tensors, dtype, wire_dtype
            ),
        )

    def bucketed_reduce_scatter(
        self,
        gradients: Sequence[Sequence[tf.Tensor]],
        wire_dtype: tf.DType | None = None,
        label: str = "bucket",
    ) -> list[list[tf.Tensor]]:
        """Sums gradients in buckets and leaves each replica with its rows of
        each sum (`rows.row_parts`): per bucket, every replica packs the rows
        of each destination after one another and one reduce-scatter sends
        each destination its chunk.

        Args:
            gradients: `gradients[k][i]` is replica i's part of gradient k.
            wire_dtype: As in `bucketed_sum`.
            label: Prefix of the transfers' labels.

        Returns:
            `result[k][r]`: replica r's rows of the sum of gradient k, on its
            device.
        """
        n = self.num_replicas

        def pack_by_destination(parts):
            cut = [row_parts(part, n) for part in parts]
            flat = tf.concat(
                [buckets.pack([rows[r] for rows in cut]) for r in range(n)], axis=0
            )
            return flat, [rows[0] for rows in cut]

        return self._in_buckets(
            gradients,
            label,
            pack_by_destination,
            lambda flats, name, tensors, dtype: self._sum_flat(
                flats, name, tensors, dtype, wire_dtype, self.scatter_sum
            ),
        )

    def _in_buckets(self, gradients, label, pack, send) -> list[list[tf.Tensor]]:
        """Per bucket, `pack(parts)` -> (flat, parts' shapes to unpack the
        output by) on each replica's device, then `send(flats, label, count,
        dtype)` -> one output per replica, unpacked into `result[k][i]`.

        Buckets are filled in the order the backward produces the gradients
        (`buckets.ready_order`), and bucket b's ops are named under
        `<label>_<b>/` (`bucket_0/`), for timelines and tests to find."""
        results: list[list[tf.Tensor]] = [[] for _ in gradients]
        first_replica = [parts[0] for parts in gradients]
        plan = buckets.plan(
            first_replica, self.bucket_bytes, buckets.ready_order(first_replica)
        )
        for b, members in enumerate(plan):
            name = f"{label} {b}"
            with tf.name_scope(_SCOPE_UNSAFE.sub("_", name)):
                flats, likes = [], []
                for i in range(self.num_replicas):
                    with tf.device(gradients[members[0]][i].device):
                        flat, like = pack([gradients[k][i] for k in members])
                    flats.append(flat)
                    likes.append(like)
                outputs = send(
                    flats, name, len(members), first_replica[members[0]].dtype
                )
                for output, like in zip(outputs, likes, strict=True):
                    with tf.device(output.device):
                        pieces = buckets.unpack(output, like)
                    for k, piece in zip(members, pieces, strict=True):
                        results[k].append(piece)
        return results

    def _sum_flat(self, flats, label, tensors, dtype, wire_dtype, collective=None):
        collective = collective or self.sum
        if wire_dtype is None or wire_dtype == dtype:
            return collective(flats, label, tensors)
        scales = [None] * len(flats)
        if wire_dtype == tf.float16:
            scales = self._float16_scales(flats, label)
        wire = []
        for flat, scale in zip(flats, scales, strict=True):
            with tf.device(flat.device):
                wire.append(
                    tf.cast(
                        flat if scale is None else flat * tf.cast(scale, dtype),
                        wire_dtype,
                    )
                )
        sums = collective(wire, label, tensors)
        decoded = []
        for total, scale in zip(sums, scales, strict=True):
            with tf.device(total.device):
                total = tf.cast(total, dtype)
                decoded.append(
                    total if scale is None else total / tf.cast(scale, dtype)
                )
        return decoded

    def _float16_scales(self, flats, label):
        # Sum of the replicas' largest magnitudes bounds every part and the
        # sum; one scalar per replica, and every device derives the same scale.
        maxima = []
        for flat in flats:
            with tf.device(flat.device):
                maxima.append(
                    tf.reshape(tf.cast(tf.reduce_max(tf.abs(flat)), tf.float32), [1])
                )
        bounds = self.sum(maxima, f"{label} float16 scale")
        scales = []
        for bound in bounds:
            with tf.device(bound.device):
                exponent = tf.floor(
                    tf.math.log(FLOAT16_SAFE_MAX / tf.maximum(bound[0], 1e-30))
                    / tf.math.log(2.0)
                )
                scales.append(tf.pow(2.0, tf.clip_by_value(exponent, -60.0, 60.0)))
        return scales
