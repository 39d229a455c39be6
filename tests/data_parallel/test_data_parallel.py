"""Transparency: DataParallel trains to the numbers of single-device training."""

import pytest
from models import CASES
from transparency import (
    devices,
    max_history_diff,
    max_weight_diff,
    one_device,
    train,
)

import keras_parallel


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_device(case, num_devices):
    build, data, tolerance = CASES[case]
    reference, reference_history = one_device(case)
    strategy = keras_parallel.DataParallel(devices(num_devices))
    model, history = train(build, data, strategy)
    assert max_weight_diff(model, reference) <= tolerance
    assert max_history_diff(history, reference_history) <= tolerance


@pytest.mark.parametrize("case", ["mlp_sgd_momentum", "embedding_lstm_adamw"])
def test_replicated_optimizer_matches_one_device(case):
    build, data, tolerance = CASES[case]
    reference, reference_history = one_device(case)
    strategy = keras_parallel.DataParallel(devices(2), sharding=None)
    model, history = train(build, data, strategy)
    assert max_weight_diff(model, reference) <= tolerance
    assert max_history_diff(history, reference_history) <= tolerance
