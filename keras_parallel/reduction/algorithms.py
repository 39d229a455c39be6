"""All-reduce algorithms: how one tensor per device becomes their sum on
every device. Each is a small implementation of `AllReduceAlgorithm`."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import tensorflow as tf

from keras_parallel._tf_internal import PerReplica, nccl_all_sum

NAMES = ("auto", "in_process", "nccl")


class AllReduceAlgorithm(abc.ABC):
    """Sums tensors held one per device."""

    name: str
    # Bucket capacity when the user gives none: the size that suits the
    # algorithm's fixed cost per reduction.
    default_bucket_mb: float
    # Processes whose parts each sum adds up: the parts passed in are this
    # process's share.
    num_workers: int = 1
    # Whether `reduce_scatter` sends only each destination's chunk; if not, it
    # is an all-reduce whose result each device slices (and costs as much).
    scatters_natively: bool = False

    @abc.abstractmethod
    def all_reduce(self, parts: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Sums `parts` (one per device, in replica order) in their dtype.

        Args:
            parts: Tensors of one shape and dtype, each on its device.

        Returns:
            One sum per part, on that part's device.
        """

    def reduce_scatter(self, flats: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Sums `flats` (one flat tensor per device, in replica order, of N
        equal chunks for N devices) and leaves device r with chunk r of the sum.

        Args:
            flats: 1-D tensors of one length, divisible by their number.

        Returns:
            One chunk of the sum per device, on that device.
        """
        chunk = flats[0].shape[0] // len(flats)
        sums = self.all_reduce(flats)
        chunks = []
        for r, total in enumerate(sums):
            with tf.device(total.device):
                chunks.append(total[r * chunk : (r + 1) * chunk])
        return chunks


class InProcessAllReduce(AllReduceAlgorithm):
    """Each device receives every part and adds them itself, in replica order.

    Every device so holds a bit-identical sum. In a `tf.function`, a sum that
    nothing reads is pruned, so a result needed on one device only (a variable
    updated by its owner) costs one reduction to that device. For CPUs and
    any devices without NCCL.
    """

    name = "in_process"
    # Measured on CPU devices (benchmarks/step_time.py --bucket-mb): a single
    # 25 MB bucket makes a 2x1024 MLP step 10% slower than 0.25 MB buckets,
    # since one device's add then waits for the whole model's gradients.
    default_bucket_mb = 0.25

    scatters_natively = True

    def all_reduce(self, parts):
        sums = []
        for destination in parts:
            with tf.device(destination.device):
                sums.append(tf.add_n(list(parts)))
        return sums

    def reduce_scatter(self, flats):
        chunk = flats[0].shape[0] // len(flats)
        sums = []
        for r, destination in enumerate(flats):
            pieces = []
            for flat in flats:
                # Cut where the flat lives, so that only the chunk travels.
                with tf.device(flat.device):
                    pieces.append(flat[r * chunk : (r + 1) * chunk])
            with tf.device(destination.device):
                sums.append(tf.add_n(pieces))
        return sums


class NcclAllReduce(AllReduceAlgorithm):
    """NVIDIA NCCL's all-reduce between GPUs of one machine."""

    name = "nccl"
    default_bucket_mb = 25.0  # PyTorch DDP's bucket_cap_mb

    def all_reduce(self, parts):
        return nccl_all_sum(list(parts))


class CollectiveAllReduce(AllReduceAlgorithm):
    """tf.distribute's collective all-reduce over the replicas of all workers.

    The engine of `tf.distribute.MultiWorkerMirroredStrategy` (ring over gRPC
    between hosts, NCCL between GPUs where chosen); DataParallel uses it when
    it runs on several workers.

    Args:
        collective: The strategy's `tf.distribute` collective ops over this
            worker's replica devices.
        num_workers: Number of workers taking part.
    """

    name = "collective"
    default_bucket_mb = 25.0  # each bucket is one collective, a network round trip

    def __init__(self, collective: tf.distribute.CrossDeviceOps, num_workers: int):
        self._collective = collective
        self.num_workers = num_workers

    def all_reduce(self, parts):
        per_replica = PerReplica(list(parts))
        reduced = self._collective.reduce(
            tf.distribute.ReduceOp.SUM, per_replica, destinations=per_replica
        )
        # A single local part comes back as a plain tensor.
        return list(getattr(reduced, "values", (reduced,)))


def resolve_algorithm(
    reduction: str | AllReduceAlgorithm, devices: Sequence[str]
) -> AllReduceAlgorithm:
    """The algorithm for `reduction` on `devices`.

    `"auto"` is NCCL when every device is a GPU and TensorFlow was built with
    CUDA, else the in-process reduction.

    Raises:
        ValueError: for an unknown name, or NCCL on devices that are not GPUs.
    """
    if isinstance(reduction, AllReduceAlgorithm):
        return reduction
    if reduction not in NAMES:
        raise ValueError(
            f"Unknown `reduction`: {reduction!r}. Allowed: "
            f"{', '.join(map(repr, NAMES))}, or a "
            "keras_parallel.reduction.AllReduceAlgorithm."
        )
    types = sorted({tf.DeviceSpec.from_string(d).device_type for d in devices})
    nccl_possible = types == ["GPU"] and tf.test.is_built_with_cuda()
    if reduction == "nccl" and not nccl_possible:
        raise ValueError(
            "reduction='nccl' needs GPUs and a TensorFlow built with CUDA; the "
            f"devices are of type {types}. Use reduction='in_process' (or 'auto', "
            "which picks NCCL where it can)."
        )
    if reduction == "nccl" or (reduction == "auto" and nccl_possible):
        return NcclAllReduce()
    return InProcessAllReduce()
