"""`sharding="auto"` chooses by memory and traffic: with a compression it
keeps the optimizer state whole (no uncompressed all-gather) unless memory
requires splitting it (`modes/auto_sharding.py`)."""

import pytest
from models import mlp_sgd_momentum
from transparency import devices

import keras_parallel
from keras_parallel.data_parallel.modes.auto_sharding import (
    STATE_PER_WEIGHT_BYTE,
    memory_requires_split,
)


def slot_rows_per_device(options) -> set:
    """The rows each device holds of the momentum of the first kernel (16
    rows) when the model is built under `DataParallel(**options)`; {"owner"}
    when it is one whole copy on its owner device."""
    strategy = keras_parallel.DataParallel(devices(2), **options)
    with strategy.scope():
        model = mlp_sgd_momentum()
        model.optimizer.build(model.trainable_variables)
    # Keras makes the slots in the order of the weights.
    momentum = [v for v in model.optimizer.variables if "momentum" in v.name][0]
    if not hasattr(momentum.value, "values"):
        assert momentum.value.shape[0] == 16
        return {"owner"}
    return {copy.shape[0] for copy in momentum.value.values}


def test_with_a_compression_the_state_stays_whole_where_memory_allows():
    # CPUs report no memory limit: replicated state never overflows it.
    assert slot_rows_per_device({"compression": "bf16"}) == {16}
    assert slot_rows_per_device({"compression": "bf16", "sharding": None}) == {16}
    # Without compression a small weight's state is whole on its owner.
    assert slot_rows_per_device({}) == {"owner"}
    # Asked for, the state is split by rows.
    assert slot_rows_per_device({"sharding": "optimizer"}) == {8}
    options = {"compression": "bf16", "sharding": "optimizer"}
    assert slot_rows_per_device(options) == {8}


@pytest.mark.parametrize(
    "weight_bytes, limits, split",
    [
        # No device reports its memory (CPUs, GPUs without a logical limit).
        (10**12, [None, None], False),
        # Weights, gradients and two slots within half the memory: whole.
        (1000, [2 * STATE_PER_WEIGHT_BYTE * 1000, None], False),
        # Over half of the smallest device known: split.
        (1000, [2 * STATE_PER_WEIGHT_BYTE * 1000 - 1, 10**9], True),
    ],
)
def test_memory_requires_splitting_past_half_the_smallest_device(
    weight_bytes, limits, split
):
    assert memory_requires_split(weight_bytes, limits) is split
