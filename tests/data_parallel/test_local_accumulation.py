"""Gradient accumulation under DataParallel: replicas accumulate locally and
communicate once per optimizer update, with single-device numbers.

Tolerance 1e-5, as in test_optimizer_options.py: summing k replica-local
partial sums instead of k whole-batch gradients only reorders float32
additions (observed ≤ 2e-7 on these weights).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_weight_diff, train

import keras_parallel
from keras_parallel.reduction import Compression, NoCompression

RNG = np.random.RandomState(5)
X = RNG.rand(160, 12).astype("float32")
Y = RNG.randint(0, 4, 160)
BATCH = 16  # 10 steps: with k=4, updates after steps 4 and 8, 2 steps pending


def build(k=4, optimizer=keras.optimizers.Adam):
    def make():
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(4),
            ]
        )
        model.compile(
            optimizer=optimizer(0.01, gradient_accumulation_steps=k),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    return make


class CountingCompression(Compression):
    """Sums as `NoCompression` does and counts, in the graph, how many
    reductions actually run."""

    name = "counting"

    def __init__(self):
        self.runs = tf.Variable(0, trainable=False)

    def reduce(self, gradients, communicator, state=None):
        with tf.control_dependencies([self.runs.assign_add(1)]):
            sums = NoCompression().reduce(gradients, communicator)
            return [[tf.identity(s) for s in parts] for parts in sums]


def fit_counting(k):
    counter = CountingCompression()
    strategy = keras_parallel.DataParallel(devices(2), compression=counter)
    model, _ = train(build(k), dict(x=X, y=Y, batch_size=BATCH, epochs=1), strategy)
    return model, strategy, int(counter.runs.numpy())


def test_reduces_once_per_update_with_single_device_numbers():
    reference, _ = train(build(), dict(x=X, y=Y, batch_size=BATCH, epochs=1))
    model, strategy, runs = fit_counting(4)
    _, plain, plain_runs = fit_counting(None)

    assert (runs, plain_runs) == (2, 10)  # 10 steps: 2 updates, vs every step
    assert max_weight_diff(model, reference) <= 1e-5
    for ours, theirs in zip(
        model.optimizer.variables, reference.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)

    stats, every_step = strategy.communication_stats(), plain.communication_stats()
    assert stats["steps_per_update"] == 4 and every_step["steps_per_update"] == 1
    assert stats["bytes_per_update"] == every_step["bytes_per_step"] > 0
    assert stats["bytes_per_step"] == every_step["bytes_per_step"] / 4


def test_replicas_hold_their_own_partial_sums():
    """Between updates each replica's copy holds its own share; their sum
    is the single-device accumulator, which `get_weights` and saving read."""
    data = dict(x=X[:96], y=Y[:96], batch_size=BATCH, epochs=1)  # 6 steps
    reference, _ = train(build(), data)
    model, _ = train(build(), data, keras_parallel.DataParallel(devices(2)))
    pending = 0
    for ours, theirs in zip(
        model.optimizer.variables, reference.optimizer.variables, strict=True
    ):
        if "gradient_accumulator" not in ours.path:
            continue
        copies = [c.numpy() for c in ours.value.values]
        pending += int(not np.allclose(copies[0], copies[1]))
        np.testing.assert_allclose(np.sum(copies, axis=0), theirs.numpy(), atol=1e-6)
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    assert pending == 4  # every accumulator: kernels and biases of 2 layers


@pytest.mark.parametrize("reload_under", ["DataParallel", "one device"])
def test_resume_mid_accumulation_equals_uninterrupted(tmp_path, reload_under):
    first = dict(x=X[:96], y=Y[:96], batch_size=BATCH, epochs=1)  # 2 pending
    rest = dict(x=X[96:], y=Y[96:], batch_size=BATCH, epochs=1, verbose=0)
    reference, _ = train(build(), first)
    reference.fit(shuffle=False, **rest)

    model, _ = train(build(), first, keras_parallel.DataParallel(devices(2)))
    path = str(tmp_path / "mid.keras")
    model.save(path)
    if reload_under == "DataParallel":
        with keras_parallel.DataParallel(devices(4)).scope():
            resumed = keras.models.load_model(path)
    else:
        resumed = keras.models.load_model(path)
    resumed.fit(shuffle=False, **rest)
    assert max_weight_diff(resumed, reference) <= 1e-5


def test_sgd_momentum_unsharded_and_four_devices():
    data = dict(x=X, y=Y, batch_size=BATCH, epochs=2)
    make = build(3, lambda lr, **kw: keras.optimizers.SGD(lr * 10, momentum=0.9, **kw))
    reference, ref_history = train(make, data)
    for strategy in (
        keras_parallel.DataParallel(devices(4)),
        keras_parallel.DataParallel(devices(2), sharding=None),
    ):
        model, history = train(make, data, strategy)
        assert max_weight_diff(model, reference) <= 1e-5
        np.testing.assert_allclose(history["loss"], ref_history["loss"], atol=1e-5)


def test_gradient_accumulation_updates_as_keras_expects():
    # Keras' optimizer_distribute_test.py::test_gradient_accumulation: every
    # replica hands the same gradient g (one tensor) in an eager custom loop,
    # and the optimizer is built inside its first `apply`. The update every 3
    # steps is Keras' expected one; the accumulator holds the whole batch's
    # sum, 2 g per step on 2 replicas (MirroredStrategy shows one replica's).
    strategy = keras_parallel.DataParallel(devices(2))
    with strategy.scope():
        v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
        g = tf.constant([[1.0, 1.0], [2.0, 2.0]])
        optimizer = keras.optimizers.SGD(1.0, gradient_accumulation_steps=3)
        for step in (1, 2):
            strategy.run(lambda: optimizer.apply_gradients([(g, v)]))
            np.testing.assert_allclose(v, [[1.0, 2.0], [3.0, 4.0]])
            [accumulated] = [w for w in optimizer.variables if "accumulator" in w.path]
            np.testing.assert_allclose(accumulated, 2 * step * g.numpy())
        strategy.run(lambda: optimizer.apply_gradients([(g, v)]))
    np.testing.assert_allclose(v, [[-1.0, 0.0], [-1.0, 0.0]])
    assert int(optimizer.iterations.numpy()) == 1
