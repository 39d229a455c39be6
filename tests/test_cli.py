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
