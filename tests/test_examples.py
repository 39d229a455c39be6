"""The examples in examples/ run, and do what they say."""

import pathlib
import sys

import numpy as np
from transparency import devices

import keras_parallel

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import transformer_block  # noqa: E402


def test_transformer_block_splits_its_bytes_evenly_over_four_devices():
    strategy = keras_parallel.PipelineParallel(devices(4))
    with strategy.scope():
        model = transformer_block.build_model()
    rng = np.random.RandomState(0)
    x = rng.randint(1, transformer_block.VOCABULARY, (64, transformer_block.LENGTH))
    history = model.fit(x, x[:, 0] % 2, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    report = keras_parallel.placement_report(model)
    totals = [t.total_bytes for t in report.devices.values()]
    assert len(totals) == 4
    # Adam: weights plus two slots each, split over the devices within 1%.
    assert max(totals) <= 1.01 * sum(totals) / 4
    assert sum(totals) >= 3 * 4 * model.count_params()
