"""Exchanges of per-device tensors, for both forms of tensor parallelism.

The layers of `keras_parallel.layers` hold every device's tensor in one
program: `sum_on` adds their partial results on one device (TensorFlow's
gradient of it hands each device the same gradient back), and
`Sharding.cut`/`Sharding.join` cut and join split features.

Under MeshParallel each replica holds its own tensor, and the exchanges are
differentiable ops for replica context. Megatron-LM (Shoeybi et al., 2019)
writes tensor parallelism with two conjugate operators: `f` is the identity
forward and an all-reduce of the input's gradient backward (before a layer
whose weight is split on its output axis), `g` an all-reduce forward and the
identity backward (after a layer split on its input axis). A column-parallel
layer followed by a row-parallel one thus costs one all-reduce forward and
one backward. `gather_shards` and `split_shards` join and cut a tensor split
along an axis, for layers whose neighbours need the whole tensor.

Each op exchanges only among the replicas of one model group (one batch
index); its ops are named `mesh_<kind>_<model axis>_<batch index>` so the
traced graph shows which group ran them. `MeshExchanges` records each one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from keras_parallel._tf_internal import regroup
from keras_parallel.reduction.algorithms import AllReduceAlgorithm
from keras_parallel.tensor_parallel.shards import Sharding


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One exchange of a traced step, as one replica sees it.

    Attributes:
        kind: `"all_reduce"` or `"all_gather"`.
        axis: The mesh axis it runs along (the model axis).
        phase: `"forward"` or `"backward"`.
        elements: Elements one replica sends.
        bytes: Bytes one replica sends.
    """

    kind: str
    axis: str
    phase: str
    elements: int
    bytes: int


class MeshExchanges:
    """Sums and gathers among the replicas of each model group.

    Args:
        groups: The replicas of each model group (one list per batch index),
            in shard order.
        axis: The name of the mesh axis the groups run along.
        algorithm: Returns the all-reduce algorithm (resolved lazily by the
            reduction engine).
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        axis: str,
        algorithm: Callable[[], AllReduceAlgorithm],
    ):
        self.groups = [list(group) for group in groups]
        self.axis = axis
        self._algorithm = algorithm
        self._shard_index = {r: i for group in self.groups for i, r in enumerate(group)}
        self.log: list[Exchange] = []

    def shard_index(self, replica: int) -> int:
        """The index of `replica` in its model group: the shard it holds."""
        return self._shard_index[replica]

    def _record(self, kind, phase, value):
        elements = value.shape.num_elements() or 0
        self.log.append(
            Exchange(kind, self.axis, phase, elements, elements * value.dtype.size)
        )

    def all_reduce(self, value, phase: str):
        """Cross-replica: sums `value` (per replica) within each model group."""
        algorithm = self._algorithm()
        values = list(value.values)
        out = [None] * len(values)
        self._record("all_reduce", phase, values[0])
        for b, group in enumerate(self.groups):
            with tf.name_scope(f"mesh_all_reduce_{self.axis}_{b}"):
                sums = algorithm.all_reduce([values[r] for r in group])
            for r, total in zip(group, sums, strict=True):
                out[r] = total
        return regroup(out)

    def all_gather(self, value, axis: int, phase: str):
        """Cross-replica: joins the shards of each model group along `axis`."""
        values = list(value.values)
        out = [None] * len(values)
        self._record("all_gather", phase, values[0])
        for b, group in enumerate(self.groups):
            sharding = Sharding(axis, len(group))
            with tf.name_scope(f"mesh_all_gather_{self.axis}_{b}"):
                for r in group:
                    with tf.device(values[r].device):
                        out[r] = sharding.join([values[q] for q in group])
        return regroup(out)


def sum_on(partials: Sequence[tf.Tensor], device: str) -> tf.Tensor:
    """The sum of per-device partial results, computed on `device`.

    Args:
        partials: One partial result per device, of one shape.
        device: Where the sum is computed (and its gradient handed out).

    Returns:
        The sum, on `device`.
    """
    with tf.device(device):
        return tf.add_n(list(partials))


def _exchanges() -> MeshExchanges:
    return tf.distribute.get_strategy().extended.mesh_exchanges


def _merge(method, value, *args):
    # Only the tensor crosses the merge call; the other arguments are the
    # same in every replica.
    return tf.distribute.get_replica_context().merge_call(
        lambda strategy, value: method(strategy.extended.mesh_exchanges, value, *args),
        args=(value,),
    )


def shard_index() -> int:
    """The shard this replica holds: its index along the model axis (replica
    context)."""
    context = tf.distribute.get_replica_context()
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return _exchanges().shard_index(int(replica))


def _own_shard(x, axis: int):
    shards = len(_exchanges().groups[0])
    return Sharding(axis, shards).cut(x)[shard_index()]


def enter_model_parallel(x):
    """Megatron's `f`: identity forward, all-reduce of the gradient backward."""

    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return _merge(MeshExchanges.all_reduce, dy, "backward")

        return tf.identity(x), grad

    return f(x)


def sum_partials(x):
    """Megatron's `g`: all-reduce forward, identity backward."""

    @tf.custom_gradient
    def g(x):
        def grad(dy):
            return tf.identity(dy)

        return _merge(MeshExchanges.all_reduce, x, "forward"), grad

    return g(x)


def gather_shards(x, axis: int):
    """Joins a tensor split over the model group along `axis`; backward, each
    replica keeps its shard of the (replicated) gradient."""

    @tf.custom_gradient
    def gather(x):
        def grad(dy):
            return _own_shard(dy, axis)

        return _merge(MeshExchanges.all_gather, x, axis, "forward"), grad

    return gather(x)


def split_shards(x, axis: int):
    """Each replica keeps its shard of a replicated tensor along `axis`;
    backward, the shards' gradients are joined again."""

    @tf.custom_gradient
    def split(x):
        def grad(dy):
            return _merge(MeshExchanges.all_gather, dy, axis, "backward")

        return _own_shard(x, axis), grad

    return split(x)
