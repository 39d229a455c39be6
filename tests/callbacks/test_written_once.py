"""keras_parallel.callbacks' file-writing callbacks on one worker are Keras'
own: the same files with the same contents (on several workers:
tests/data_parallel/test_multi_worker_files.py)."""

import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_parallel

RNG = np.random.RandomState(5)
X = RNG.rand(96, 6).astype("float32")
Y = (X.sum(axis=1, keepdims=True) > 3).astype("float32")


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def model():
    keras.utils.set_random_seed(2)
    # Named: TensorBoard's histograms are tagged with the weights' paths.
    built = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    built.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return built


def fit(net, callbacks, epochs=3):
    return net.fit(
        X,
        Y,
        batch_size=16,
        epochs=epochs,
        validation_split=0.25,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def write_files(module, folder):
    """Trains with `module`'s file-writing callbacks, interrupted in epoch 2
    and resumed (the backup kept); returns the model."""
    net = model()
    backup = module.BackupAndRestore(str(folder / "backup"), delete_checkpoint=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(net, [backup, _Interrupt()])
    # Resumed: only epoch 2 runs.
    fit(
        net,
        [
            backup,
            module.ModelCheckpoint(
                str(folder / "best_{epoch}.keras"), save_best_only=True
            ),
            module.ModelCheckpoint(
                str(folder / "last.weights.h5"), save_weights_only=True
            ),
            module.CSVLogger(str(folder / "log.csv")),
            module.TensorBoard(str(folder / "logs"), histogram_freq=1),
        ],
    )
    return net


def files(folder):
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()
    )


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()])
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return arrays


def events(folder):
    """(folder, tag, step, value) of every scalar and histogram written."""
    found = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "graph_keras_model":
                    continue  # the model's config, which names its layers
                array = tf.make_ndarray(value.tensor)
                found.append((path.parent.name, value.tag, event.step, array.tolist()))
    return found


def test_on_one_device_the_files_are_keras_own(tmp_path):
    theirs, ours = tmp_path / "keras", tmp_path / "ours"
    theirs_model = write_files(keras.callbacks, theirs)
    ours_model = write_files(keras_parallel.callbacks, ours)
    for a, b in zip(theirs_model.get_weights(), ours_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Event files are named after the time and the process: compare counts.
    names = [f for f in files(theirs) if "tfevents" not in f]
    assert [f for f in files(ours) if "tfevents" not in f] == names
    assert "backup/latest.weights.h5" in names and "best_3.keras" in names
    assert (ours / "log.csv").read_text() == (theirs / "log.csv").read_text()
    metadata = "backup/training_metadata.json"
    assert json.loads((ours / metadata).read_text()) == {"epoch": 3, "batch": 0}
    assert (ours / metadata).read_text() == (theirs / metadata).read_text()
    for name in ("backup/latest.weights.h5", "last.weights.h5"):
        mine, keras_own = h5_arrays(ours / name), h5_arrays(theirs / name)
        assert mine.keys() == keras_own.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], keras_own[key])
    for name in (n for n in names if n.endswith(".keras")):
        mine = keras.models.load_model(ours / name).get_weights()
        keras_own = keras.models.load_model(theirs / name).get_weights()
        for a, b in zip(mine, keras_own, strict=True):
            np.testing.assert_array_equal(a, b)
    assert events(ours / "logs") == events(theirs / "logs") != []
