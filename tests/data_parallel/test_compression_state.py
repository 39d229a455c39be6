"""PowerSGD's memory belongs to a strategy and an optimizer, and checkpoints
hold it: a resumed run continues exactly, on any number of devices."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import StopAtEpoch, devices, max_weight_diff

import keras_parallel

EPOCHS = 4
# 4 steps per epoch, 3 of them uncompressed warm-up: a run that forgot its
# step count would warm up again, one that forgot its error memory would
# lose what the approximation missed so far.
FIT = dict(batch_size=32, shuffle=False, verbose=0)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 12)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(12, 3))).astype("float32")
    return x, y


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(24, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    return model


def powersgd():
    return keras_parallel.PowerSGD(rank=1, warmup_steps=3)


def strategy(num_devices=2, compression=None):
    return keras_parallel.DataParallel(
        devices(num_devices), compression=compression or powersgd()
    )


def fit(model, epochs=EPOCHS, callbacks=()):
    x, y = data()
    return model.fit(x, y, epochs=epochs, callbacks=list(callbacks), **FIT)


def trained(epochs):
    """A model trained for `epochs` under a new strategy."""
    with strategy().scope():
        model = build()
    fit(model, epochs=epochs)
    return model


@pytest.fixture(scope="module")
def uninterrupted():
    with (parallel := strategy()).scope():
        model = build()
    fit(model)
    return model, parallel


@pytest.mark.parametrize("resume_devices", [2, 4])
def test_backup_and_restore_resumes_powersgd_exactly(
    tmp_path, uninterrupted, resume_devices
):
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with strategy().scope():
        model = build()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, callbacks=[backup, StopAtEpoch(2)])
    # A new process would build a new strategy, compression and model.
    with (resumed_strategy := strategy(resume_devices)).scope():
        resumed = build()
    history = fit(resumed, callbacks=[backup])
    assert history.epoch == [2, 3]
    reference, reference_strategy = uninterrupted
    # PowerSGD's result depends on the replicas' summed error only, so it
    # continues on another device count too.
    assert max_weight_diff(resumed, reference) <= 1e-5
    (state,) = resumed_strategy.extended.gradient_reduction.states.all()
    (expected,) = reference_strategy.extended.gradient_reduction.states.all()
    saved, wanted = state.arrays(), expected.arrays()
    assert saved["step"] == wanted["step"] == EPOCHS * 4
    np.testing.assert_allclose(saved["error_0_0"], wanted["error_0_0"], atol=1e-5)
    assert np.abs(wanted["error_0_0"]).max() > 1e-3  # there was memory to keep


def test_a_saved_model_resumes_powersgd_exactly(tmp_path, uninterrupted):
    model = trained(epochs=2)
    model.save(tmp_path / "model.keras")
    with strategy().scope():
        loaded = keras.models.load_model(tmp_path / "model.keras")
    fit(loaded, epochs=EPOCHS - 2)
    assert max_weight_diff(loaded, uninterrupted[0]) <= 1e-5
    # Without a strategy the file loads as plain weights.
    plain = keras.models.load_model(tmp_path / "model.keras")
    assert max_weight_diff(plain, model) == 0.0


def test_without_the_saved_memory_the_resumed_run_differs(tmp_path, uninterrupted):
    # What the two tests above guard against: the same resumption with the
    # compression state left out of the checkpoint.
    model = trained(epochs=2)
    model.save_weights(tmp_path / "w.weights.h5")
    with strategy().scope():
        resumed = build()
        resumed.optimizer.build(resumed.trainable_variables)
    plain = build()  # same layers, no strategy: its file has no compression state
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(tmp_path / "w.weights.h5")
    plain.save_weights(tmp_path / "plain.weights.h5")
    resumed.load_weights(tmp_path / "plain.weights.h5")
    fit(resumed, epochs=EPOCHS - 2)
    assert max_weight_diff(resumed, uninterrupted[0]) > 1e-3


def test_one_powersgd_object_keeps_separate_state_per_strategy_and_model(
    uninterrupted,
):
    shared = powersgd()
    first_strategy = strategy(compression=shared)
    with first_strategy.scope():
        first, second = build(), build()
    fit(first)
    fit(second)  # same shapes as `first`: must not inherit its error memory
    with strategy(compression=shared).scope():
        third = build()
    fit(third)  # a notebook re-run: new strategy, same compression object
    for model in (first, second, third):
        assert max_weight_diff(model, uninterrupted[0]) <= 1e-6
    assert len(first_strategy.extended.gradient_reduction.states.all()) == 2


def test_a_restored_state_of_another_model_is_refused(tmp_path):
    model = trained(epochs=1)
    model.save_weights(tmp_path / "w.weights.h5")
    with strategy(compression=keras_parallel.PowerSGD(rank=2)).scope():
        other = build()
        other.optimizer.build(other.trainable_variables)
    other.load_weights(tmp_path / "w.weights.h5")
    with pytest.raises(ValueError, match=r"`q_0_0` being restored has shape \(24, 1\)"):
        fit(other, epochs=1)


def test_the_state_lives_on_the_devices_of_the_strategy_using_it():
    shared = powersgd()
    placements = []
    for names in (["CPU:0", "CPU:1"], ["CPU:2", "CPU:3"]):
        parallel = keras_parallel.DataParallel(names, compression=shared)
        with parallel.scope():
            model = build()
        fit(model, epochs=1)
        (state,) = parallel.extended.gradient_reduction.states.all()
        (group,) = state._groups.values()
        placements.append(
            {
                tf.DeviceSpec.from_string(variable.device).device_index
                for entry in group
                for variable in entry["q"] + entry["error"]
            }
        )
    assert placements == [{0, 1}, {2, 3}]
