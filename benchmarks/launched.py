"""How the benchmarks start a cluster with `keras-parallel launch`."""

from __future__ import annotations

import os
import sys

LAUNCHER = [sys.executable, "-m", "keras_parallel", "launch"]
# How each line the launcher itself prints begins.
REPORT_PREFIX = "keras-parallel launch: "


def cluster_env() -> dict:
    """This process's environment for a launched job: without a TF_CONFIG of
    its own (the launcher gives each task one), TensorFlow quiet."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3"}
