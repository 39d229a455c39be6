"""`DataParallel(sharding=...)`: what is split over the devices, the numbers
of one device in every mode, and what each mode sends."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from models import CASES
from test_sharded_optimizer import four_equal_layers, traced_train_step
from transparency import (
    StopAtEpoch,
    devices,
    max_history_diff,
    max_weight_diff,
    one_device,
    train,
)

import keras_parallel

RNG = np.random.RandomState(5)
X = RNG.rand(64, 32).astype("float32")
Y = RNG.rand(64, 16).astype("float32")
DATA = dict(x=X, y=Y, batch_size=16, epochs=2)


def mlp():
    # Every weight's rows divide by 2 and 4, so no part is padded and the
    # bytes below are the weights' own.
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(16),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


KERNEL_BYTES = 4 * (32 * 64 + 64 * 16)
WEIGHT_BYTES = KERNEL_BYTES + 4 * (64 + 16)


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reduce_scattered_gradients_match_single_device(case, num_devices):
    build, data, tolerance = CASES[case]
    reference, reference_history = one_device(case)
    strategy = keras_parallel.DataParallel(devices(num_devices), sharding="gradients")
    model, history = train(build, data, strategy)
    assert max_weight_diff(model, reference) <= tolerance
    assert max_history_diff(history, reference_history) <= tolerance


def trained_stats(sharding, num_devices=4, compression=None):
    strategy = keras_parallel.DataParallel(
        devices(num_devices), sharding=sharding, compression=compression
    )
    model, _ = train(mlp, DATA, strategy)
    return model, strategy.communication_stats()


def test_each_mode_sends_what_its_collectives_carry():
    n = 4
    share = (n - 1) / n
    # The optimizer's step counter (int64) is updated on its owner device
    # and broadcast to the other copies in the sharded modes.
    counter = 8
    _, replicated = trained_stats(None)
    _, optimizer = trained_stats("optimizer")
    _, gradients = trained_stats("gradients")
    # None: one all-reduce of the gradients, nothing gathered.
    assert replicated["all_reduce_bytes_per_step"] == WEIGHT_BYTES
    assert replicated["reduce_scatter_bytes_per_step"] == 0
    assert replicated["all_gather_bytes_per_step"] == 0
    assert replicated["broadcast_bytes_per_step"] == 0
    assert replicated["bytes_per_step"] == WEIGHT_BYTES
    assert replicated["ring_bytes_per_step"] == pytest.approx(2 * share * WEIGHT_BYTES)
    # "optimizer": the same all-reduce, then each device puts its updated
    # rows (1/N of the weights) into an all-gather into every copy: 1.5
    # times the traffic.
    assert optimizer["all_reduce_bytes_per_step"] == WEIGHT_BYTES
    assert optimizer["all_gather_bytes_per_step"] == WEIGHT_BYTES / n
    assert optimizer["broadcast_bytes_per_step"] == counter / n
    assert optimizer["bytes_per_step"] == (WEIGHT_BYTES + (WEIGHT_BYTES + counter) / n)
    assert optimizer["ring_bytes_per_step"] == pytest.approx(
        3 * share * WEIGHT_BYTES + share * counter
    )
    # "auto" (the default): this MLP's small weights are each updated whole
    # by one owner, which broadcasts the new weight: the same traffic.
    _, auto = trained_stats("auto")
    assert auto["all_reduce_bytes_per_step"] == WEIGHT_BYTES
    assert auto["all_gather_bytes_per_step"] == 0
    assert auto["broadcast_bytes_per_step"] == (WEIGHT_BYTES + counter) / n
    assert auto["ring_bytes_per_step"] == pytest.approx(
        optimizer["ring_bytes_per_step"]
    )
    # "gradients": a reduce-scatter instead, as much traffic as None.
    assert gradients["all_reduce_bytes_per_step"] == 0
    assert gradients["reduce_scatter_bytes_per_step"] == WEIGHT_BYTES
    assert gradients["all_gather_bytes_per_step"] == WEIGHT_BYTES / n
    assert gradients["ring_bytes_per_step"] == pytest.approx(
        replicated["ring_bytes_per_step"] + share * counter
    )
    assert gradients["bytes_per_step"] == WEIGHT_BYTES + (WEIGHT_BYTES + counter) / n
    kinds = {b["kind"] for b in gradients["buckets"]}
    assert kinds == {"reduce_scatter", "all_gather", "broadcast"}
    # "parameters": the weights gathered forward and the Dense kernels again
    # backward, the gradients reduce-scattered: about 1.5 times None's.
    _, parameters = trained_stats("parameters")
    gathered = WEIGHT_BYTES + KERNEL_BYTES
    assert parameters["all_reduce_bytes_per_step"] == 0
    assert parameters["reduce_scatter_bytes_per_step"] == WEIGHT_BYTES
    assert parameters["all_gather_bytes_per_step"] == gathered / n
    assert parameters["ring_bytes_per_step"] == pytest.approx(
        share * (WEIGHT_BYTES + gathered + counter)
    )


def test_each_device_adds_only_its_rows():
    strategy = keras_parallel.DataParallel(devices(2), sharding="gradients")
    with strategy.scope():
        model = four_equal_layers()
    graph = traced_train_step(strategy, model)
    # Each reduce-scatter bucket: every device adds the two replicas' chunks
    # for it, half of the bucket, and nothing adds a whole bucket.
    buckets = strategy.communication_stats()["buckets"]
    scattered = [b["elements"] for b in buckets if b["kind"] == "reduce_scatter"]
    assert sum(scattered) == 4 * 64 * 64
    sums = sorted(
        (op.device.rsplit(":", 1)[-1], op.outputs[0].shape.num_elements())
        for op in graph.get_operations()
        if op.type == "AddN"
    )
    expected = sorted((str(r), e // 2) for e in scattered for r in range(2))
    assert sums == expected


@pytest.mark.parametrize("compression", ["bf16", "fp16"])
def test_half_precision_reduce_scatter_adds_as_the_all_reduce(compression):
    # The same parts are added in the same order in the same dtype: a
    # reduce-scatter and an all-reduce give the same sums.
    scattered, stats = trained_stats("gradients", compression=compression)
    reduced, _ = trained_stats("optimizer", compression=compression)
    assert max_weight_diff(scattered, reduced) == 0.0
    assert stats["reduce_scatter_bytes_per_step"] == WEIGHT_BYTES // 2
    reference, _ = train(mlp, DATA)
    assert max_weight_diff(scattered, reference) <= 1e-2


def mlp_with_batch_norm():
    model = keras.Sequential(
        [
            keras.Input((32,)),
            # No bias before BatchNormalization: its gradient would be pure
            # rounding, which Adam scales up to whole steps.
            keras.layers.Dense(64, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(16),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


@pytest.mark.parametrize("sharding", ["gradients", "parameters"])
def test_saved_model_loads_without_strategy_and_on_other_devices(tmp_path, sharding):
    def strategy(n):
        return keras_parallel.DataParallel(devices(n), sharding=sharding)

    checkpoint = str(tmp_path / "checkpoint.keras")
    model, _ = train(
        mlp_with_batch_norm,
        dict(DATA, callbacks=[keras.callbacks.ModelCheckpoint(checkpoint)]),
        strategy(2),
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    plain = keras.models.load_model(path)
    for ours, theirs in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # ModelCheckpoint's file of the last epoch holds the same whole weights.
    assert max_weight_diff(keras.models.load_model(checkpoint), plain) == 0.0
    # Loaded under 4 devices, training goes on as on one device.
    reference, _ = train(mlp_with_batch_norm, dict(DATA, epochs=3))
    with strategy(4).scope():
        resumed = keras.models.load_model(path)
    resumed.fit(verbose=0, shuffle=False, **dict(DATA, epochs=1))
    assert max_weight_diff(resumed, reference) <= 1e-5
    # set_weights cuts whole values into each device's part again.
    resumed.set_weights(plain.get_weights())
    assert max_weight_diff(resumed, plain) == 0.0
    # A weights file (what ModelCheckpoint writes) holds whole weights too.
    weights_path = str(tmp_path / "model.weights.h5")
    model.save_weights(weights_path)
    other = mlp_with_batch_norm()
    other.load_weights(weights_path)
    assert max_weight_diff(other, plain) == 0.0


@pytest.mark.parametrize("sharding", ["gradients", "parameters"])
def test_backup_and_restore_resumes_on_another_device_count(tmp_path, sharding):
    kwargs = dict(DATA, epochs=4)
    reference, _ = train(mlp_with_batch_norm, kwargs)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = dict(kwargs, callbacks=[backup, StopAtEpoch(2)])
    with pytest.raises(RuntimeError, match="interrupted"):
        train(
            mlp_with_batch_norm,
            interrupted,
            keras_parallel.DataParallel(devices(2), sharding=sharding),
        )
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model, history = train(
        mlp_with_batch_norm,
        dict(kwargs, callbacks=[backup]),
        keras_parallel.DataParallel(devices(4), sharding=sharding),
    )
    assert len(history["loss"]) == 2  # epochs 3 and 4
    assert max_weight_diff(model, reference) <= 1e-5


def test_unknown_mode_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError) as raised:
        keras_parallel.DataParallel(devices(2), sharding="zero3")
    message = str(raised.value)
    assert "Unknown `sharding`: 'zero3'" in message
    for mode in ("'optimizer'", "'gradients'", "None"):
        assert mode in message


def test_powersgd_cannot_reduce_scatter():
    with pytest.raises(ValueError) as raised:
        keras_parallel.DataParallel(
            devices(2), sharding="gradients", compression=keras_parallel.PowerSGD(2)
        )
    assert "compression=PowerSGD(rank=2," in str(raised.value)
    assert "sharding='optimizer'" in str(raised.value)


def test_shard_optimizer_is_deprecated_and_maps_onto_sharding():
    with pytest.warns(DeprecationWarning, match="use `sharding=None`"):
        strategy = keras_parallel.DataParallel(devices(2), shard_optimizer=False)
    with strategy.scope():
        model = mlp()
        model.optimizer.build(model.trainable_variables)
    # Replicated: every slot is a whole copy on each device.
    for slot in model.optimizer.variables[2:]:
        assert [c.shape for c in slot.value.values] == [slot.shape] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_parallel.DataParallel(devices(2), sharding=None)
    with pytest.raises(ValueError, match="Pass `sharding` alone"):
        keras_parallel.DataParallel(
            devices(2), sharding="gradients", shard_optimizer=True
        )


def test_mesh_refuses_reduce_scattered_gradients():
    mesh = keras.distribution.DeviceMesh(
        (2, 2), ("batch", "model"), [f"cpu:{i}" for i in range(4)]
    )
    with pytest.raises(ValueError, match="sharding='optimizer' or None"):
        keras_parallel.MeshParallel(
            keras.distribution.LayoutMap(mesh), sharding="gradients"
        )
