"""ParallelEmbedding against keras.layers.Embedding."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graph_devices import short
from transparency import devices, train

import keras_parallel
from keras_parallel.layers import ParallelEmbedding

IDS = np.random.RandomState(0).randint(0, 40, (5, 7))


def embedding():
    keras.utils.set_random_seed(0)
    layer = keras.layers.Embedding(40, 6)
    layer.build()
    return layer


@pytest.mark.parametrize("num_devices", [2, 4])
def test_same_outputs_and_gradients_as_embedding(num_devices):
    plain = embedding()
    sharded = ParallelEmbedding.from_layer(plain, devices(num_devices))
    weights = tf.constant(np.random.RandomState(1).normal(size=(5, 7, 6)), "float32")

    def run(layer, variables):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(IDS) * weights)
        return layer(IDS), tape.gradient(loss, variables)

    y, grads = run(sharded, sharded.tables)
    y_ref, (grad_ref,) = run(plain, plain.trainable_variables)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    full = np.concatenate([tf.convert_to_tensor(g).numpy() for g in grads])
    np.testing.assert_allclose(full, tf.convert_to_tensor(grad_ref), atol=1e-6)
    assert [short(t.value.device) for t in sharded.tables] == [
        f"CPU:{i}" for i in range(num_devices)
    ]
    assert {tuple(t.shape) for t in sharded.tables} == {(40 // num_devices, 6)}
    np.testing.assert_array_equal(
        sharded.to_layer().get_weights()[0], plain.get_weights()[0]
    )


def model(parallel):
    def build():
        keras.utils.set_random_seed(0)
        layer = ParallelEmbedding(40, 6, mask_zero=True) if parallel else None
        layer = layer or keras.layers.Embedding(40, 6, mask_zero=True)
        model = keras.Sequential(
            [
                keras.Input((7,), dtype="int32"),
                layer,
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(2),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        return model

    return build


DATA = dict(
    x=IDS.repeat(8, axis=0), y=np.random.RandomState(2).rand(40, 2), batch_size=8
)


@pytest.mark.parametrize("under_model_parallel", [False, True])
def test_fit_equals_plain_embedding_and_slots_are_sharded(under_model_parallel):
    strategy = (
        keras_parallel.PipelineParallel(devices(2)) if under_model_parallel else None
    )
    sharded_model, history = train(model(True), DATA, strategy)
    plain_model, plain_history = train(model(False), DATA)
    np.testing.assert_allclose(history["loss"], plain_history["loss"], atol=1e-5)
    np.testing.assert_allclose(
        sharding_full(sharded_model.layers[0]),
        plain_model.layers[0].get_weights()[0],
        atol=1e-5,
    )
    if under_model_parallel:
        table_slots = [
            s for s in sharded_model.optimizer.variables if "embeddings" in s.path
        ]
        assert sorted(short(s.value.device) for s in table_slots) == [
            "CPU:0",
            "CPU:0",
            "CPU:1",
            "CPU:1",
        ]
        assert {tuple(s.shape) for s in table_slots} == {(20, 6)}


def sharding_full(layer):
    return np.concatenate([np.asarray(t) for t in layer.tables])


def test_saves_and_loads_on_another_number_of_devices(tmp_path):
    trained, _ = train(model(True), DATA)  # no strategy: all 4 devices
    assert len(trained.layers[0].tables) == 4
    path = str(tmp_path / "embedding.keras")
    trained.save(path)
    with keras_parallel.PipelineParallel(devices(2)).scope():
        loaded = keras.models.load_model(path)
    assert len(loaded.layers[0].tables) == 2
    np.testing.assert_allclose(
        loaded.predict(DATA["x"], verbose=0),
        trained.predict(DATA["x"], verbose=0),
        atol=1e-6,
    )


def test_vocabulary_must_split_evenly():
    with pytest.raises(ValueError, match="`input_dim`=10 does not split evenly over 4"):
        ParallelEmbedding(10, 3, devices(4))
