"""`DataParallel(sync_every=H, outer_optimizer=...)`: local SGD and DiLoCo.

The reference is the algorithm run by hand (`replicas_alone.py`): one plain
Keras model per replica on its piece of each batch, averaged every H steps.
Tolerance 1e-5: the replicas' sums of float32 changes, added in another
order than NumPy's mean, move these weights by ~1e-7 (measured).
"""

import keras
import numpy as np
import pytest
from replicas_alone import ReplicasAlone
from transparency import devices

import keras_parallel

RNG = np.random.RandomState(5)
X = RNG.rand(192, 12).astype("float32")
Y = RNG.randint(0, 4, 192)
BATCH = 32  # 6 steps an epoch


def build(optimizer, batch_norm=True):
    # No bias before BatchNormalization: its gradient is rounding noise,
    # which Adam scales up to whole steps.
    layers = [keras.Input((12,)), keras.layers.Dense(24, use_bias=not batch_norm)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.ReLU())
    model = keras.Sequential([*layers, keras.layers.Dense(4)])
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=0.05),
    "accumulation": lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
}


def outer_nesterov():
    return keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)


def fit(strategy, make_optimizer, epochs=2, batch_norm=True):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(make_optimizer(), batch_norm)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def copies(model) -> list[list[np.ndarray]]:
    """Each weight's per-device copies."""
    return [[c.numpy() for c in w.value.values] for w in model.weights]


def assert_replicas_bit_equal(model):
    for weight, values in zip(model.weights, copies(model), strict=True):
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0], err_msg=weight.path)


# Every inner optimizer option under local SGD; the outer optimizer, which
# sees only the averaged changes, with Adam and SGD+momentum inside.
CASES = [(2, option, False) for option in sorted(OPTIMIZERS)] + [
    (2, "adam", True),
    (2, "sgd_momentum", True),
    (4, "adam", False),
    (4, "adam", True),
]


@pytest.mark.parametrize(
    "replicas, option, outer",
    CASES,
    ids=[f"{n}-{o}-{'diloco' if d else 'local_sgd'}" for n, o, d in CASES],
)
def test_equals_replicas_training_alone(replicas, option, outer):
    # 12 steps, synchronizing every 3 updates: after steps 3, 6, 9 and 12,
    # or with 2 steps an update, after steps 6 and 12.
    steps_between = 3 * (2 if option == "accumulation" else 1)
    strategy = keras_parallel.DataParallel(
        devices(replicas),
        sync_every=3,
        outer_optimizer=outer_nesterov() if outer else None,
    )
    model = fit(strategy, OPTIMIZERS[option])
    reference = ReplicasAlone(
        build,
        OPTIMIZERS[option],
        replicas,
        steps_between,
        outer_nesterov() if outer else None,
    ).train(X, Y, BATCH, 12)
    assert_close(model.get_weights(), reference.synchronized)
    assert_replicas_bit_equal(model)


def assert_close(weights, expected, atol=1e-5):
    for ours, theirs in zip(weights, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=atol)


def largest_difference(a, b) -> float:
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b, strict=True))


def test_outside_a_step_the_model_holds_the_synchronized_weights(tmp_path):
    # 2 epochs of 6 steps with sync_every=5: synchronized after steps 5 and
    # 10; steps 11 and 12 stay in the replicas.
    strategy = keras_parallel.DataParallel(devices(2), sync_every=5)
    model = fit(strategy, OPTIMIZERS["adam"])
    reference = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 5).train(X, Y, BATCH, 12)
    assert_close(model.get_weights(), reference.synchronized)
    assert largest_difference(reference.synchronized, reference.own[0]) > 1e-3
    assert_replicas_bit_equal(model)
    # evaluate, predict and saving see them, as a plain model holding them.
    plain = build(keras.optimizers.Adam(0.01))
    plain.set_weights(reference.synchronized)
    np.testing.assert_allclose(
        model.evaluate(X, Y, verbose=0), plain.evaluate(X, Y, verbose=0), rtol=1e-5
    )
    np.testing.assert_allclose(
        model.predict(X, verbose=0), plain.predict(X, verbose=0), atol=1e-5
    )
    model.save_weights(tmp_path / "w.weights.h5")
    loaded = build(keras.optimizers.Adam(0.01))
    loaded.load_weights(tmp_path / "w.weights.h5")
    assert_close(loaded.get_weights(), reference.synchronized)
    # The replicas' own steps are kept for the next fit: 12 more steps give
    # the synchronized weights after step 20.
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    reference.train(X, Y, BATCH, 12)
    assert_close(model.get_weights(), reference.synchronized)


@pytest.mark.parametrize("outer", [False, True], ids=["local_sgd", "diloco"])
def test_set_weights_between_fits_reaches_every_replica(outer):
    make_outer = outer_nesterov if outer else lambda: None
    strategy = keras_parallel.DataParallel(
        devices(2), sync_every=4, outer_optimizer=make_outer()
    )
    model = fit(strategy, OPTIMIZERS["sgd_momentum"], epochs=1)  # 6 steps
    reference = ReplicasAlone(
        build, OPTIMIZERS["sgd_momentum"], 2, 4, make_outer()
    ).train(X, Y, BATCH, 6)
    start = [w + 0.5 for w in model.get_weights()]
    model.set_weights(start)
    reference.set_weights(start)
    assert_replicas_bit_equal(model)
    # Steps 7 and 8 start from `start` on both replicas; after step 8 they
    # meet (each keeps its momentum).
    model.fit(X[:64], Y[:64], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    reference.train(X[:64], Y[:64], BATCH, 2)
    assert_close(model.get_weights(), reference.synchronized)
    assert largest_difference(model.get_weights(), start) > 1e-3


@pytest.mark.parametrize("option", ["adam", "sgd"])
def test_sync_every_1_is_synchronous_training(option):
    make = OPTIMIZERS.get(option, lambda: keras.optimizers.SGD(0.1))
    synchronous = fit(keras_parallel.DataParallel(devices(2)), make)
    model = fit(keras_parallel.DataParallel(devices(2), sync_every=1), make)
    assert_close(model.get_weights(), synchronous.get_weights(), atol=0)
    keras.utils.set_random_seed(0)
    one_device = build(make())
    one_device.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert_close(model.get_weights(), one_device.get_weights())


def test_with_8_steps_between_meetings_an_eighth_of_the_bytes():
    """Without BatchNormalization a model's weights are its gradients' size:
    one all-reduce of them every 8 steps sends 1/8 of synchronous training's
    per-step all-reduce of the gradients."""
    synchronous = keras_parallel.DataParallel(devices(4), sharding=None)
    fit(synchronous, OPTIMIZERS["sgd_momentum"], epochs=1, batch_norm=False)
    local = keras_parallel.DataParallel(devices(4), sync_every=8)
    model = fit(local, OPTIMIZERS["sgd_momentum"], epochs=1, batch_norm=False)
    weight_bytes = sum(w.numpy().nbytes for w in model.weights)
    every_step = synchronous.communication_stats()["bytes_per_step"]
    stats = local.communication_stats()
    assert every_step == weight_bytes
    assert stats["bytes_per_update"] == weight_bytes
    assert stats["steps_per_update"] == 8
    assert stats["bytes_per_step"] <= every_step / 8


@pytest.mark.parametrize("compression", ["bf16", "fp16"])
def test_compressed_meetings_leave_the_replicas_bit_equal(compression):
    """Compression works on the changes since the last meeting, which are
    small next to the weights."""
    strategy = keras_parallel.DataParallel(
        devices(2), sync_every=3, compression=compression
    )
    model = fit(strategy, OPTIMIZERS["adam"])
    reference = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 3).train(X, Y, BATCH, 12)
    assert_replicas_bit_equal(model)
    # The changes travel in 16 bits: ~3 significant digits of each change.
    assert_close(model.get_weights(), reference.synchronized, atol=1e-2)
    sent = {
        b["dtype"]
        for b in strategy.communication_stats()["buckets"]
        if "scale" not in b["label"]  # fp16's scale, a float32 scalar
    }
    assert sent == {"bfloat16" if compression == "bf16" else "float16"}


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(sync_every=0), ValueError, "`sync_every` must be an integer >= 1"),
        (dict(sync_every=2.5), ValueError, "Received: sync_every=2.5"),
        (dict(sync_every="8"), ValueError, "Received: sync_every='8'"),
        (
            dict(outer_optimizer=keras.optimizers.SGD(0.7)),
            ValueError,
            "needs `sync_every` > 1",
        ),
        (
            dict(sync_every=8, outer_optimizer="nesterov"),
            TypeError,
            "`outer_optimizer` must be a Keras optimizer",
        ),
        (
            dict(sync_every=8, sharding="optimizer"),
            ValueError,
            "Received: sharding='optimizer'",
        ),
        (
            dict(sync_every=8, sharding="parameters"),
            ValueError,
            "Leave `sharding` unset (or None)",
        ),
        (
            dict(sync_every=8, sync_batch_norm=True),
            ValueError,
            "Leave `sync_batch_norm` unset (or False)",
        ),
    ],
)
def test_bad_arguments(kwargs, error, fragment):
    with pytest.raises(error) as raised:
        keras_parallel.DataParallel(devices(2), **kwargs)
    assert fragment in str(raised.value)


def test_powersgd_compresses_the_changes():
    strategy = keras_parallel.DataParallel(
        devices(2), sync_every=3, compression=keras_parallel.PowerSGD(rank=1)
    )
    model = fit(strategy, OPTIMIZERS["adam"], batch_norm=False)
    assert_replicas_bit_equal(model)
    stats = strategy.communication_stats()
    # The 12x24 kernel sends (12 + 24) values instead of 288.
    assert stats["bytes_per_update"] < 0.5 * stats["fp32_bytes_per_step"] * 3


def test_steps_per_execution_runs_the_same_steps():
    strategy = keras_parallel.DataParallel(devices(2), sync_every=3)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(OPTIMIZERS["adam"]())
        model.compile(
            model.optimizer, model.loss, steps_per_execution=4
        )  # 4 steps in one call, meetings inside it
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    reference = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 3).train(X, Y, BATCH, 12)
    assert_close(model.get_weights(), reference.synchronized)
    assert_replicas_bit_equal(model)


def test_a_cell_run_again_trains_a_new_model_and_frees_the_old_copies():
    import gc

    strategy = keras_parallel.DataParallel(
        devices(2), sync_every=3, outer_optimizer=outer_nesterov()
    )
    fit(strategy, OPTIMIZERS["adam"], epochs=1)
    gc.collect()
    model = fit(strategy, OPTIMIZERS["adam"])  # the cell again: a new model
    reference = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 3, outer_nesterov()).train(
        X, Y, BATCH, 12
    )
    assert_close(model.get_weights(), reference.synchronized)
    gc.collect()
    averaging = strategy.extended.mode.averaging
    assert len(averaging._copies) == len(model.weights)  # the first model's: gone


@pytest.mark.parametrize("samples", [35, 33], ids=["uneven", "one_short"])
def test_short_last_batches_as_the_replicas_alone(samples):
    """Epochs of 32 + 3 samples (pieces 2 and 1) or 32 + 1 (pieces 1 and 0:
    that replica does not step, and BatchNormalization's statistics of no
    samples do not reach its weights)."""
    strategy = keras_parallel.DataParallel(devices(2), sync_every=3)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(OPTIMIZERS["adam"]())
    model.fit(
        X[:samples], Y[:samples], batch_size=BATCH, epochs=3, verbose=0, shuffle=False
    )
    reference = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 3).train(
        X[:samples], Y[:samples], BATCH, 6
    )
    assert_close(model.get_weights(), reference.synchronized)
    assert_replicas_bit_equal(model)


class WeightsAfterEachBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(self.model.get_weights())


def test_callbacks_see_the_last_synchronization():
    # sync_every=4 over 6 steps: after steps 1-3 the initial weights, after
    # steps 4-6 those of the meeting after step 4.
    strategy = keras_parallel.DataParallel(devices(2), sync_every=4)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(OPTIMIZERS["adam"]())
    initial = model.get_weights()
    callback = WeightsAfterEachBatch()
    model.fit(
        X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
    )
    met = ReplicasAlone(build, OPTIMIZERS["adam"], 2, 4).train(X, Y, BATCH, 4)
    for seen in callback.seen[:3]:
        assert_close(seen, initial, atol=0)
    for seen in callback.seen[3:]:
        assert_close(seen, met.synchronized)
