"""Global batches split across replicas inside the step function.

`tf.distribute.MirroredStrategy` feeds replicas through a multi-device
iterator that Keras rebuilds every epoch (about 0.2 s each on TF 2.21) and
that cannot run inside the `tf.while_loop` Keras uses for
`steps_per_execution > 1` (keras-team/keras#19246). Here the dataset keeps
yielding global batches on the host, and each batch is cut into per-replica
pieces by ops traced into the step itself: `tf.split` on the host, then one
copy to each replica's device. Creating an epoch's iterator costs what a plain
`iter(dataset)` costs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import (
    CompositeTensor,
    DistributedDataset,
    PerReplica,
    PerReplicaSpec,
    regroup,
)


def replica_batch_sizes(global_size: tf.Tensor, num_replicas: int) -> tf.Tensor:
    """Sizes of the per-replica pieces of a batch of `global_size` samples.

    The first `global_size % num_replicas` replicas get one sample more, so
    that an uneven last batch is split as evenly as possible.

    Args:
        global_size: Scalar int32 tensor, the number of samples in the batch.
        num_replicas: Number of replicas.

    Returns:
        An int32 tensor of shape `[num_replicas]` that sums to `global_size`.
    """
    base = global_size // num_replicas
    remainder = global_size % num_replicas
    extra = tf.cast(tf.range(num_replicas) < remainder, tf.int32)
    return base + extra


def replica_loss_weights(sizes, num_replicas: int) -> tf.Tensor | None:
    """N * n_i / n for each replica i, from the pieces' `sizes`
    (`piece_sizes`), or None when the step has no per-replica input.

    Summing the replicas' gradients of their own mean losses gives the
    single-device gradient only when every replica holds n/N samples. A
    global batch that does not split evenly (or a short last batch) breaks
    that: MirroredStrategy and PyTorch DDP then weight a replica with fewer
    samples as much as one with more. Weighting replica i by n_i / n (this
    over N, `loss_weights`) makes the sum exactly the gradient of the mean
    over all n samples, also through BatchNormalization's global statistics.
    """
    if sizes is None:
        return None
    # float64: a float32 share would round a float64 model's loss.
    sizes = tf.cast(tf.stack(sizes), tf.float64)
    return num_replicas * sizes / tf.reduce_sum(sizes)


def piece_sizes(args) -> list[tf.Tensor] | None:
    """Samples in each local replica's piece of a step's input (scalar int32
    tensors, from the first per-replica tensor of `args`), or None when
    `args` holds no per-replica tensor."""
    for leaf in tf.nest.flatten(args, expand_composites=False):
        if isinstance(leaf, PerReplica):
            sizes = []
            for part in leaf.values:
                if part.shape.rank and part.shape[0] is not None:
                    # Known while tracing: decisions on it are taken then.
                    sizes.append(tf.constant(part.shape[0], tf.int32))
                    continue
                # Read on the piece's own device: a Shape op elsewhere would
                # copy the whole piece there first.
                with tf.device(part.device):
                    sizes.append(tf.shape(part)[0])
            return sizes
    return None


def if_has_samples(size, with_samples, without_samples):
    """`with_samples()` if a piece of `size` samples (from `piece_sizes`;
    None: unknown, taken as not empty) is not empty, else
    `without_samples()`: decided while tracing when the size is static (an
    evenly split batch), otherwise by a `tf.cond`."""
    known = None if size is None else tf.get_static_value(size)
    if size is not None and known is None:
        return tf.cond(size > 0, with_samples, without_samples)
    return with_samples() if known is None or known > 0 else without_samples()


def split_batch(
    batch,
    host: str,
    devices: tuple[str, ...],
    first_replica: int = 0,
    num_replicas: int | None = None,
    replicas_per_piece: int = 1,
):
    """Splits every tensor of `batch` along axis 0, one piece per replica
    (or per `replicas_per_piece` consecutive replicas), and keeps the pieces
    of this process's replicas.

    Args:
        batch: A nest of tensors sharing their first dimension.
        host: Device on which the global batch lives.
        devices: This process's replica devices, in replica order.
        first_replica: Index of `devices[0]` among all replicas (across
            workers, every worker reads the whole global batch).
        num_replicas: All replicas; None means `len(devices)`.
        replicas_per_piece: Replicas that take the same piece (the model
            group of a device mesh).

    Returns:
        The nest of `batch`, with each tensor replaced by a `PerReplica`
        whose i-th value is piece `(first_replica + i) // replicas_per_piece`,
        on `devices[i]`.
    """
    total = (num_replicas or len(devices)) // replicas_per_piece
    leaves = tf.nest.flatten(batch)
    for leaf in leaves:
        if not isinstance(leaf, tf.Tensor):
            raise TypeError(
                "DataParallel splits batches of dense tensors; the dataset "
                f"yields a {type(leaf).__name__}. Convert it to a dense "
                "tensor in the dataset (e.g. `x.to_tensor()` for ragged)."
            )
    with tf.device(host):
        sizes = replica_batch_sizes(tf.shape(leaves[0])[0], total)
        pieces = [tf.split(leaf, sizes, num=total) for leaf in leaves]
    per_replica = []
    for i, device in enumerate(devices):
        with tf.device(device):
            local = [
                tf.identity(leaf_pieces[(first_replica + i) // replicas_per_piece])
                for leaf_pieces in pieces
            ]
        per_replica.append(tf.nest.pack_sequence_as(batch, local))
    return regroup(tuple(per_replica), always_wrap=True)


def split_whole_batch(args, host: str, devices, share: tuple):
    """`args` of a Keras step that holds whole batches (`train_on_batch`,
    `test_on_batch` and `predict_on_batch` hand the batch to `strategy.run`
    as it is, so every replica would compute all of it) with each tensor
    split as `split_batch` splits a dataset's batches; `args` unchanged when
    it holds per-replica values or no tensor. `share` is
    `SplitBatchIterator`'s (first replica, replicas, replicas per piece)."""
    leaves = tf.nest.flatten(args)
    if any(isinstance(leaf, PerReplica) for leaf in leaves):
        return args
    batch = [i for i, leaf in enumerate(leaves) if _is_batch(leaf)]
    if not batch:
        return args
    pieces = split_batch(
        [tf.convert_to_tensor(leaves[i]) for i in batch], host, devices, *share
    )
    for i, piece in zip(batch, pieces, strict=True):
        leaves[i] = piece
    return tf.nest.pack_sequence_as(args, leaves)


def _is_batch(leaf) -> bool:
    return isinstance(leaf, (tf.Tensor, np.ndarray)) and len(leaf.shape) > 0


def common_samples(value):
    """Makes per-replica values reducible elementwise: those holding
    different numbers of samples are cut to the number all replicas hold, and
    those that cannot be added (strings) are taken from the first replica.

    Keras reduces the first batch with `strategy.reduce("MEAN", batch,
    axis=None)` only to learn its shapes and dtypes. MirroredStrategy cannot
    do that for an uneven global batch (TensorFlow raises "Inputs to
    operation AddN ... must have the same size") nor for text ("Value for
    attr 'T' of string is not in the list of allowed values"), so a model
    with a TextVectorization or StringLookup layer fails before training.
    Values with equal or unknown shapes are returned unchanged.
    """

    def cut(v):
        if not isinstance(v, PerReplica):
            return v
        text = any(part.dtype == tf.string for part in v.values)
        shapes = [part.shape for part in v.values]
        if not all(s.rank and s.is_fully_defined() for s in shapes):
            return v.values[0] if text else v
        sizes = {s[0] for s in shapes}
        n = min(sizes - {0} or {0})
        if text or 0 in sizes:
            # A replica without samples (fewer samples than replicas).
            return v.values[0][:n]
        if len(sizes) == 1:
            return v
        return PerReplica(tuple(part[:n] for part in v.values))

    return tf.nest.map_structure(cut, value)


def _replica_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    return tf.TensorSpec([None] + spec.shape[1:].as_list(), spec.dtype)


def per_replica_element_spec(global_spec, num_replicas: int):
    """The element spec of `split_batch` applied to elements of `global_spec`."""
    return tf.nest.map_structure(
        lambda s: PerReplicaSpec(*[_replica_spec(s)] * num_replicas),
        global_spec,
    )


class SplitBatchDataset(DistributedDataset):
    """A dataset of global batches whose iterators yield per-replica pieces.

    It derives from TensorFlow's own distributed dataset class (whose
    constructor it does not run) because Keras' `fit` recognizes a
    distributed dataset by that class's name (`is_tf_dataset` in
    `keras/src/trainers/data_adapters/`), so that
    `model.fit(strategy.experimental_distribute_dataset(ds))` works as under
    MirroredStrategy.

    Args:
        dataset: A `tf.data.Dataset` yielding global batches.
        host: The device holding the input pipeline.
        devices: This process's replica devices.
        first_replica: Index of `devices[0]` among all replicas.
        num_replicas: All replicas, across workers; None: `len(devices)`.
        replicas_per_piece: Replicas that take the same piece of a batch.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        host: str,
        devices,
        first_replica: int = 0,
        num_replicas: int | None = None,
        replicas_per_piece: int = 1,
    ):
        self._dataset = dataset
        self._host = host
        self._devices = tuple(devices)
        self._share = (
            first_replica,
            num_replicas or len(self._devices),
            replicas_per_piece,
        )

    def __iter__(self) -> SplitBatchIterator:
        with tf.device(self._host):
            iterator = iter(self._dataset)
        return SplitBatchIterator(iterator, self._host, self._devices, self._share)

    @property
    def element_spec(self):
        return per_replica_element_spec(self._dataset.element_spec, len(self._devices))

    @property
    def cardinality(self):
        return self._dataset.cardinality()

    @property
    def _type_spec(self):
        raise TypeError(
            "A DataParallel distributed dataset cannot be passed to a "
            "`tf.function` as an argument; pass its iterator "
            "(`iter(dataset)`) instead, or iterate it inside the function."
        )

    def reduce(self, initial_state, reduce_func):
        raise NotImplementedError(
            "DataParallel datasets do not support `reduce`; iterate them in "
            "a `tf.function` instead."
        )


class SplitBatchIteratorSpec(tf.TypeSpec):
    """Type spec of `SplitBatchIterator`, so that a `tf.function` taking an
    iterator is traced once for all epochs."""

    __slots__ = ["_iterator_spec", "_host", "_devices", "_share"]

    value_type = property(lambda self: SplitBatchIterator)

    def __init__(
        self, iterator_spec, host: str, devices: tuple[str, ...], share: tuple
    ):
        self._iterator_spec = iterator_spec
        self._host = host
        self._devices = tuple(devices)
        self._share = tuple(share)

    def _serialize(self):
        return (self._iterator_spec, self._host, self._devices, self._share)

    @property
    def _component_specs(self):
        return self._iterator_spec

    def _to_components(self, value):
        return value._iterator

    def _from_components(self, components):
        return SplitBatchIterator(components, self._host, self._devices, self._share)


class SplitBatchIterator(tf.distribute.DistributedIterator, CompositeTensor):
    """Iterator yielding each global batch as per-replica pieces.

    `share` is (index of this process's first replica, number of replicas,
    replicas per piece).
    """

    def __init__(self, iterator, host: str, devices: tuple[str, ...], share: tuple):
        self._iterator = iterator
        self._host = host
        self._devices = tuple(devices)
        self._share = tuple(share)
        self._first_batch_checked = False

    @property
    def _type_spec(self):
        return SplitBatchIteratorSpec(
            self._iterator._type_spec, self._host, self._devices, self._share
        )

    @property
    def element_spec(self):
        return per_replica_element_spec(self._iterator.element_spec, len(self._devices))

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self.get_next()
        except tf.errors.OutOfRangeError:
            raise StopIteration from None

    def get_next(self):
        batch = self._iterator.get_next()
        if tf.executing_eagerly():
            self._check_first_batch(batch)
        return split_batch(batch, self._host, self._devices, *self._share)

    def _check_first_batch(self, batch):
        # Keras takes the first batch eagerly before fit, evaluate and predict;
        # later batches may legitimately be a short remainder. A batch of
        # fewer samples than replicas is fine on one machine
        # (`empty_pieces`).
        if self._first_batch_checked:
            return
        self._first_batch_checked = True
        size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
        replicas = self._share[1] // self._share[2]
        if replicas > len(self._devices) and size % replicas:
            # Keras reduces the first batch across workers to learn its
            # shapes, which needs pieces of one shape everywhere.
            raise ValueError(
                f"The first global batch has {size} samples, which do not split "
                f"evenly over the {replicas} replicas of all workers. Use a "
                f"`batch_size` that is a multiple of {replicas}."
            )

    def get_next_as_optional(self):
        optional = self._iterator.get_next_as_optional()
        return tf.cond(
            optional.has_value(),
            lambda: tf.experimental.Optional.from_value(
                split_batch(
                    optional.get_value(), self._host, self._devices, *self._share
                )
            ),
            lambda: tf.experimental.Optional.empty(self.element_spec),
        )
