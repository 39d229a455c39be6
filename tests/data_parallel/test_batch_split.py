"""Splitting global batches into per-replica pieces."""

import numpy as np
import pytest
import tensorflow as tf
from transparency import devices

from keras_parallel.data_parallel import batch_split


@pytest.mark.parametrize(
    "size, replicas, expected",
    [(8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 2, 2]), (3, 4, [1, 1, 1, 0]), (0, 2, [0, 0])],
)
def test_replica_batch_sizes(size, replicas, expected):
    sizes = batch_split.replica_batch_sizes(tf.constant(size), replicas)
    assert sizes.numpy().tolist() == expected


def test_split_batch_places_pieces_on_their_devices():
    names = devices(3)
    batch = {"x": tf.reshape(tf.range(20.0), (10, 2)), "y": tf.range(10)}
    split = batch_split.split_batch(batch, names[0], names)
    for key in batch:
        pieces = split[key].values
        assert [p.device.split("device:")[-1] for p in pieces] == [
            "CPU:0",
            "CPU:1",
            "CPU:2",
        ]
        assert [len(p) for p in pieces] == [4, 3, 3]
        np.testing.assert_array_equal(tf.concat(pieces, 0), batch[key])


def test_iterator_yields_each_batch_once_in_order_inside_a_function():
    names = devices(2)
    dataset = tf.data.Dataset.range(10).batch(4)  # 4, 4, 2
    distributed = batch_split.SplitBatchDataset(dataset, names[0], names)

    @tf.function
    def take_all(iterator):
        first = iterator.get_next()
        optional = iterator.get_next_as_optional()
        return first.values, optional.get_value().values, iterator.get_next().values

    got = take_all(iter(distributed))
    assert [[t.numpy().tolist() for t in step] for step in got] == [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
        [[8], [9]],
    ]


def test_optional_is_empty_at_the_end():
    names = devices(2)
    iterator = iter(
        batch_split.SplitBatchDataset(
            tf.data.Dataset.range(2).batch(2), names[0], names
        )
    )
    assert iterator.get_next_as_optional().has_value()
    assert not iterator.get_next_as_optional().has_value()
    with pytest.raises(StopIteration):
        next(iterator)


def test_element_spec_has_an_unknown_replica_batch():
    names = devices(4)
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((8, 3), "float32")).batch(4)
    spec = batch_split.SplitBatchDataset(dataset, names[0], names).element_spec
    assert spec == batch_split.per_replica_element_spec(
        tf.TensorSpec([None, 3], tf.float32), 4
    )


def test_common_samples_cuts_uneven_pieces_to_the_shortest():
    from keras_parallel._tf_internal import PerReplica

    uneven = PerReplica((tf.ones((3, 2)), tf.ones((2, 2))))
    assert [v.shape[0] for v in batch_split.common_samples(uneven).values] == [2, 2]
    even = PerReplica((tf.ones((2, 2)), tf.zeros((2, 2))))
    assert batch_split.common_samples(even) is even
