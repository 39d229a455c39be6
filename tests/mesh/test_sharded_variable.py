"""A split weight reads as its shard inside a replica and as the whole
weight outside; a whole value assigned gives each copy its shard."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from mesh_models import mesh

import keras_parallel
from keras_parallel.tensor_parallel.shards import AxisShards


def _dense():
    layout_map = keras.distribution.LayoutMap(mesh((2, 2)))
    layout_map["wide/kernel"] = (None, "model")
    strategy = keras_parallel.MeshParallel(layout_map)
    with strategy.scope():
        layer = keras.layers.Dense(6, name="wide")
        layer.build((None, 3))
    return strategy, layer


def test_reads_whole_outside_and_its_shard_inside_a_replica():
    strategy, layer = _dense()
    variable = layer.kernel.value
    assert isinstance(variable, AxisShards)
    whole = layer.kernel.numpy()
    assert whole.shape == (3, 6) and variable.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(layer.kernel), whole)

    def read():
        return tf.identity(variable), tf.constant(variable.shape.as_list())

    values, shapes = strategy.run(tf.function(read))
    for replica, (value, shape) in enumerate(
        zip(values.values, shapes.values, strict=True)
    ):
        m = replica % 2
        np.testing.assert_array_equal(value.numpy(), whole[:, 3 * m : 3 * m + 3])
        assert list(shape.numpy()) == [3, 3]


def test_assigning_a_whole_value_gives_each_copy_its_shard():
    _, layer = _dense()
    value = np.arange(18, dtype="float32").reshape(3, 6)
    layer.kernel.assign(value)
    np.testing.assert_array_equal(layer.kernel.numpy(), value)
    copies = [c.numpy() for c in layer.kernel.value.values]
    for replica, copy in enumerate(copies):
        m = replica % 2
        np.testing.assert_array_equal(copy, value[:, 3 * m : 3 * m + 3])
    layer.kernel.assign_add(np.ones((3, 6), "float32"))
    np.testing.assert_array_equal(layer.kernel.numpy(), value + 1)
