"""Keras callbacks and `.keras` saving under DataParallel."""

import os

import keras
import numpy as np
from transparency import devices, max_history_diff, max_weight_diff, train

import keras_parallel

RNG = np.random.RandomState(3)
X = RNG.rand(160, 6).astype("float32")
Y = (X.sum(axis=1, keepdims=True) > 3).astype("float32")


def classifier():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def callbacks(tmp_path):
    return [
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "best.keras"), monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=1.0),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=0, min_delta=1.0
        ),
        keras.callbacks.TensorBoard(str(tmp_path / "logs")),
    ]


def fit_args(tmp_path):
    return dict(
        x=X,
        y=Y,
        batch_size=32,
        epochs=6,
        validation_split=0.2,
        callbacks=callbacks(tmp_path),
    )


def test_callbacks_behave_as_on_one_device(tmp_path):
    reference, reference_history = train(classifier, fit_args(tmp_path / "single"))
    strategy = keras_parallel.DataParallel(devices(2))
    model, history = train(classifier, fit_args(tmp_path / "parallel"), strategy)
    # EarlyStopping (min_delta=1 never improves) stops both after 2 epochs;
    # ReduceLROnPlateau lowers the learning rate.
    assert len(history["loss"]) == len(reference_history["loss"]) == 2
    assert max_history_diff(history, reference_history) <= 1e-5
    assert max_weight_diff(model, reference) <= 1e-5
    learning_rate = model.optimizer.learning_rate.numpy()
    assert learning_rate == reference.optimizer.learning_rate.numpy() < 1e-2
    best = keras.models.load_model(tmp_path / "parallel" / "best.keras")
    np.testing.assert_allclose(
        best.predict(X, verbose=0),
        keras.models.load_model(tmp_path / "single" / "best.keras").predict(
            X, verbose=0
        ),
        atol=1e-5,
    )
    event_files = os.listdir(tmp_path / "parallel" / "logs" / "train")
    assert any(name.startswith("events.out") for name in event_files)


def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path):
    class StopAtEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    strategy = keras_parallel.DataParallel(devices(2))
    backup = str(tmp_path / "backup")
    fit = dict(x=X, y=Y, batch_size=32, epochs=4)
    uninterrupted, _ = train(classifier, fit, keras_parallel.DataParallel(devices(2)))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = classifier()
    try:
        model.fit(
            verbose=0,
            shuffle=False,
            **fit,
            callbacks=[keras.callbacks.BackupAndRestore(backup), StopAtEpoch()],
        )
    except RuntimeError:
        pass
    with keras_parallel.DataParallel(devices(2)).scope():
        keras.utils.set_random_seed(1)  # different init: restore must overwrite it
        resumed = classifier()
    history = resumed.fit(
        verbose=0,
        shuffle=False,
        **fit,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    assert len(history.history["loss"]) == 2  # epochs 3 and 4 only
    assert max_weight_diff(resumed, uninterrupted) <= 1e-5


def test_save_and_load_without_strategy_and_in_a_new_scope(tmp_path):
    strategy = keras_parallel.DataParallel(devices(4))
    model, _ = train(classifier, dict(x=X, y=Y, batch_size=32, epochs=2), strategy)
    path = tmp_path / "model.keras"
    model.save(path)
    expected = model.predict(X, verbose=0)

    plain = keras.models.load_model(path)
    np.testing.assert_allclose(plain.predict(X, verbose=0), expected, atol=1e-6)

    with keras_parallel.DataParallel(devices(2)).scope():
        reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(X, verbose=0), expected, atol=1e-6)
    # Optimizer state came back too: continuing matches continuing the original.
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    reloaded.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert max_weight_diff(model, reloaded) <= 1e-5
