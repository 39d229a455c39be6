"""ReplicaConsistencyCheck: equal copies pass, a forced divergence is caught."""

import keras
import numpy as np
import pytest
from transparency import devices

import keras_parallel
from keras_parallel.callbacks import ReplicaConsistencyCheck, ReplicaDivergenceError

X = np.random.RandomState(0).rand(128, 4).astype("float32")
Y = np.random.RandomState(1).rand(128, 1).astype("float32")


def model_in(strategy):
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(1, name="head")]
        )
        model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


class Corrupt(keras.callbacks.Callback):
    """Changes replica 1's copy of the kernel after step 5, as a bug would
    (before the check of that step, which runs after it)."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 5:
            self.model.layers[0].kernel.value.values[1].assign_add(np.full((4, 1), 0.5))


@pytest.mark.parametrize("sharding", ["optimizer", None])
def test_equal_copies_pass(sharding):
    strategy = keras_parallel.DataParallel(devices(4), sharding=sharding)
    model = model_in(strategy)
    check = ReplicaConsistencyCheck(every_n_steps=1)
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[check])
    check.check()  # the copies trained alike
    # And the check covers the weights in this mode: a copy changed is seen.
    model.layers[0].kernel.value.values[1].assign_add(np.full((4, 1), 0.5))
    with pytest.raises(ReplicaDivergenceError, match="kernel"):
        check.check()


def test_a_forced_divergence_is_caught_naming_the_variable():
    model = model_in(keras_parallel.DataParallel(devices(2)))
    with pytest.raises(ReplicaDivergenceError) as raised:
        model.fit(
            X,
            Y,
            batch_size=16,
            epochs=2,
            verbose=0,
            callbacks=[Corrupt(), ReplicaConsistencyCheck(every_n_steps=5)],
        )
    message = str(raised.value)
    assert "'sequential" in message and "head/kernel'" in message
    assert "replica 1" in message and "max |difference| = 0.5" in message
    assert "at step 5" in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(every_n_steps=0), "`every_n_steps` must be an integer >= 1"),
        (dict(tolerance=-1.0), "`tolerance` must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ReplicaConsistencyCheck(**kwargs)


def test_without_a_data_parallel_strategy_it_warns_once(caplog):
    import logging

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with caplog.at_level(logging.WARNING):
        model.fit(X, Y, verbose=0, callbacks=[ReplicaConsistencyCheck(every_n_steps=1)])
    assert caplog.text.count("nothing to check") == 1
