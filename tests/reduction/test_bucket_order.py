"""Buckets are filled in the order the backward produces gradients, so the
first bucket's reduction can run while the backward still computes."""

import re

import keras
import numpy as np
import tensorflow as tf
from transparency import devices

import keras_parallel
from keras_parallel.graph_memory import traced_train_step
from keras_parallel.reduction import buckets

DEPTH = 5


def test_ready_order_follows_dependencies_then_puts_the_last_first():
    with tf.Graph().as_default():
        x = tf.constant(1.0)
        a = x * 2.0
        b = a * 3.0  # depends on a
        c = x + 1.0  # as deep as a: the later of the two comes first
        assert buckets.ready_order([b, a, c]) == [2, 1, 0]
    # Eager tensors carry no graph: last first.
    assert buckets.ready_order([tf.zeros([2])] * 3) == [2, 1, 0]


def ancestors(ops) -> set:
    """`ops` and every op they wait for (data and control inputs)."""
    seen, stack = set(), list(ops)
    while stack:
        op = stack.pop()
        if op not in seen:
            seen.add(op)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return seen


def test_first_bucket_waits_only_for_the_last_layers_gradients():
    strategy = keras_parallel.DataParallel(devices(2), bucket_mb=2000 / 2**20)
    # Names without digits: a graph's name scopes may add a `_<n>` suffix.
    names = [f"layer_{letter}" for letter in "abcde"[:DEPTH]]
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((16,))]
            + [keras.layers.Dense(16, activation="relu", name=n) for n in names[:-1]]
            + [keras.layers.Dense(4, name=names[-1])]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
    graph = traced_train_step(
        model, np.zeros((8, 16), "float32"), np.zeros((8, 4), "float32")
    )
    # Layer index of a backward op of either replica, by its Keras name scope.
    gradient_of = re.compile(
        rf"^gradient_tape/(?:replica_\d+/)?{re.escape(model.name)}(?:_\d+)?/"
        r"layer_([a-e])(?:_\d+)?/"
    )
    index = {letter: i for i, letter in enumerate("abcde")}
    bucket_of = re.compile(r"^bucket_(\d+)/")
    sums: dict[int, list] = {}  # bucket -> its reduction (sum) ops
    for op in graph.get_operations():
        found = bucket_of.match(op.name)
        if found and op.type == "AddN":
            sums.setdefault(int(found.group(1)), []).append(op)
    assert len(sums) >= 3
    assert all(len(ops) == 2 for ops in sums.values())  # one sum per device

    reached = []  # per bucket, the layers whose backward ops its sums wait for
    for b in range(len(sums)):
        waits_for = ancestors(sums[b])
        layers = {
            index[m.group(1)]
            for m in (gradient_of.match(op.name) for op in waits_for)
            if m
        }
        reached.append(layers)
        # No bucket waits for another's reduction: each starts once its own
        # gradients exist.
        others = {
            int(m.group(1)) for m in (bucket_of.match(op.name) for op in waits_for) if m
        }
        assert others == {b}, (b, others)
    # The first bucket holds the last layer's gradient and does not wait for
    # the first layer's backward: it can run before the backward ends.
    assert DEPTH - 1 in reached[0]
    assert 0 not in reached[0]
    # Later buckets reach further back; the last one waits for the first layer.
    earliest = [min(layers) for layers in reached]
    assert earliest == sorted(earliest, reverse=True), earliest
    assert earliest[-1] == 0
