"""placement_report: per-layer rows and per-device totals."""

import keras
import numpy as np
from transparency import devices

import keras_parallel


def test_four_stage_mlp_of_equal_layers_holds_an_even_share_per_device():
    strategy = keras_parallel.PipelineParallel(devices(4))
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((64,))] + [keras.layers.Dense(64) for _ in range(8)]
        )
        model.compile(keras.optimizers.Adam(), "mse")
    x = np.random.RandomState(0).rand(64, 64)
    model.fit(x, x, batch_size=32, verbose=0)
    report = keras_parallel.placement_report(model)

    assert [row.parameters for row in report.layers] == [64 * 64 + 64] * 8
    assert [row.device for row in report.layers] == [f"CPU:{i // 2}" for i in range(8)]
    assert list(report.devices) == ["CPU:0", "CPU:1", "CPU:2", "CPU:3"]
    weights = 4 * model.count_params()
    assert sum(t.weight_bytes for t in report.devices.values()) == weights
    # Adam: two slots per weight, plus its scalar step counter and rate.
    total = sum(t.total_bytes for t in report.devices.values())
    assert total >= 3 * weights
    for totals in report.devices.values():
        assert abs(totals.total_bytes - total / 4) <= 0.10 * total / 4
        assert totals.optimizer_bytes >= 2 * totals.weight_bytes

    table = str(report)
    assert "dense" in table and "optimizer bytes" in table
    assert f"{2 * (64 * 64 + 64) * 4:,}" in table  # weight bytes per device


def test_a_model_on_one_device():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    report = keras_parallel.placement_report(model)
    assert report.layers[0].bytes == 4 * 8
    assert list(report.devices) == ["CPU:0"]
    assert report.devices["CPU:0"].optimizer_bytes == 0
