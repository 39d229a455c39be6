"""Keras' own tf.distribute tests, with DataParallel in place of
MirroredStrategy (run from the installed Keras, in a fresh interpreter: they
split the CPU themselves)."""

import pathlib
import re
import subprocess
import sys

import keras

KERAS_TESTS = pathlib.Path(keras.__file__).parent / "src" / "backend" / "tensorflow"
FILES = ("distribute_test.py", "optimizer_distribute_test.py")
# Asserts MirroredStrategy's per-replica accumulator (each replica's own
# gradient) after each step; DataParallel's accumulator holds the whole
# batch's gradient, as one device's does, so that checkpoints resume on any
# device count. Its updates equal MirroredStrategy's
# (test_gradient_accumulation_updates_as_keras_expects).
BY_DESIGN = "test_gradient_accumulation"


def test_keras_distribute_tests_pass_with_data_parallel(tmp_path):
    for name in FILES:
        source = (KERAS_TESTS / name).read_text()
        source = source.replace(
            "tf.distribute.MirroredStrategy(", "keras_parallel.DataParallel("
        )
        source = source.replace(
            "import tensorflow as tf\n",
            "import tensorflow as tf\nimport keras_parallel\n",
            1,
        )
        (tmp_path / name).write_text(source)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-k", f"not {BY_DESIGN}", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.match(r"16 passed, 1 deselected", summary), summary
