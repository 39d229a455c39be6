"""The main job, `keras-parallel demo`, in a fresh process."""

import re
import subprocess
import sys

from conftest import run_python


def test_demo_prints_the_comparison_table():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_parallel",
            "demo",
            "--devices",
            "2",
            "--epochs",
            "2",
            "--samples",
            "1024",
            "--batch-size",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Epoch 2/2" in out  # Keras' progress bar for the DataParallel run
    table = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in out.split("\n\n")[-1].strip().splitlines()
    )
    assert table["devices"] == "CPU:0, CPU:1"
    assert table["global batch"] == "128"
    for setup in ("single", "MirroredStrategy", "DataParallel"):
        assert float(table[f"samples/s, {setup}"].replace(",", "")) > 0
    assert 0.0 <= float(table["test accuracy (DataParallel)"]) <= 1.0
    assert float(table["max |w - w_single|, one step"]) <= 1e-5


def test_console_script_rejects_bad_arguments():
    result = run_python(
        "import sys; from keras_parallel.cli import main; "
        "sys.exit(main(['demo', '--devices', '0']))"
    )
    assert result.returncode == 2
    assert "--devices: must be >= 1, got 0" in result.stderr


class RecordingModel:
    """Stands in for a compiled model: records its turns and reports, like
    `ThroughputMonitor`, a step time of its own."""

    def __init__(self, name, turns, step_ms):
        self.name, self.turns, self.step_ms = name, turns, step_ms

    def fit(self, x, y, batch_size, epochs, verbose, callbacks):
        import keras

        self.turns.append(self.name)
        self.callbacks = callbacks
        history = keras.callbacks.History()
        history.history = {"step_time_ms": [self.step_ms]} if callbacks else {}
        return history


def test_epoch_times_take_turns_and_steady_reads_the_step_time():
    from keras_parallel.callbacks import ThroughputMonitor
    from keras_parallel.demo import epoch_times

    turns = []
    models = {n: RecordingModel(n, turns, ms) for n, ms in (("a", 4.0), ("b", 6.0))}
    steady = epoch_times(models, (None, None), 32, rounds=3, steady=True)
    assert turns == ["a", "b", "b", "a", "a", "b"]  # a different one first
    assert steady == {"a": [0.004] * 3, "b": [0.006] * 3}
    assert [type(c) for c in models["a"].callbacks] == [ThroughputMonitor]
    whole = epoch_times(models, (None, None), 32, rounds=2)
    assert [len(t) for t in whole.values()] == [2, 2]
    assert models["a"].callbacks is None
