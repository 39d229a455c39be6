"""BatchNormalization statistics over the global batch, or per replica."""

import keras
import numpy as np
from transparency import devices, max_weight_diff, train

import keras_parallel

RNG = np.random.RandomState(5)
DATA = dict(
    x=RNG.rand(128, 6, 6, 2).astype("float32")
    * RNG.rand(128, 1, 1, 1).astype("float32"),
    y=RNG.randint(0, 2, 128),
    batch_size=32,
    epochs=2,
)


def conv_bn():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_global_statistics_by_default_per_replica_on_request():
    reference, _ = train(conv_bn, DATA)
    synced, _ = train(conv_bn, DATA, keras_parallel.DataParallel(devices(4)))
    local, _ = train(
        conv_bn, DATA, keras_parallel.DataParallel(devices(4), sync_batch_norm=False)
    )
    assert synced.layers[1].synchronized and not local.layers[1].synchronized
    assert max_weight_diff(synced, reference) <= 1e-5
    # Per-replica statistics over 8 samples instead of 32 change the numbers.
    assert max_weight_diff(local, reference) > 1e-3
