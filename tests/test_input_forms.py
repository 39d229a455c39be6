"""Every input form MirroredStrategy's `fit` takes trains as numpy arrays do
on one device, with validation data in the same form (a Python generator
under PipelineParallel once lost the batch prefetched at each epoch's end)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_history_diff, max_weight_diff

import keras_parallel

RNG = np.random.RandomState(5)
X = RNG.rand(128, 8).astype("float32")
Y = RNG.randint(0, 3, 128)
XV = RNG.rand(64, 8).astype("float32")
YV = RNG.randint(0, 3, 64)
BATCH = 32


def build():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, i):
        return self.x[i * BATCH : (i + 1) * BATCH], self.y[i * BATCH : (i + 1) * BATCH]


def generator(x, y):
    for i in itertools.cycle(range(len(x) // BATCH)):
        yield x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]


def dataset(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def from_function(strategy, x, y):
    def make(context):
        return dataset(x, y).unbatch().batch(context.get_per_replica_batch_size(BATCH))

    return strategy.distribute_datasets_from_function(make)


FORMS = {
    "numpy": lambda s: (
        dict(x=X, y=Y, batch_size=BATCH),
        dict(validation_data=(XV, YV)),
    ),
    "dataset": lambda s: (dict(x=dataset(X, Y)), dict(validation_data=dataset(XV, YV))),
    "py_dataset": lambda s: (
        dict(x=Batches(X, Y)),
        dict(validation_data=Batches(XV, YV)),
    ),
    "generator": lambda s: (
        dict(x=generator(X, Y), steps_per_epoch=len(X) // BATCH),
        dict(validation_data=generator(XV, YV), validation_steps=len(XV) // BATCH),
    ),
    "distributed_dataset": lambda s: (
        dict(x=s.experimental_distribute_dataset(dataset(X, Y))),
        dict(validation_data=s.experimental_distribute_dataset(dataset(XV, YV))),
    ),
    "from_function": lambda s: (
        dict(x=from_function(s, X, Y)),
        dict(validation_data=from_function(s, XV, YV)),
    ),
}


def fit(form, strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build()
    data, validation = FORMS[form](strategy)
    history = model.fit(**data, **validation, epochs=2, verbose=0, shuffle=False)
    return model, history.history


STRATEGIES = {
    "DataParallel": lambda: keras_parallel.DataParallel(devices(2)),
    "PipelineParallel": lambda: keras_parallel.PipelineParallel(devices(2)),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("form", sorted(FORMS))
def test_input_form_equals_one_device(form, strategy):
    reference, ref_history = fit("numpy", tf.distribute.get_strategy())
    model, history = fit(form, STRATEGIES[strategy]())
    assert max_weight_diff(model, reference) <= 1e-5
    assert max_history_diff(history, ref_history) <= 1e-5
