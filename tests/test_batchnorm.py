"""BatchNormalization statistics over the global batch, or per replica."""

from test_data_parallel import CONV_DATA, conv_batchnorm_adam
from transparency import devices, max_weight_diff, train

import keras_parallel


def test_global_statistics_by_default_per_replica_on_request():
    reference, _ = train(conv_batchnorm_adam, CONV_DATA)
    synced, _ = train(
        conv_batchnorm_adam, CONV_DATA, keras_parallel.DataParallel(devices(4))
    )
    local, _ = train(
        conv_batchnorm_adam,
        CONV_DATA,
        keras_parallel.DataParallel(devices(4), sync_batch_norm=False),
    )
    # The user's layer config is left as given (Keras saves `synchronized`).
    assert not synced.layers[1].synchronized and not local.layers[1].synchronized
    assert max_weight_diff(synced, reference) <= 1e-5
    # Per-replica statistics over 8 samples instead of 32 change the numbers.
    assert max_weight_diff(local, reference) > 1e-3
