"""Runs a task script on a local cluster of ps and worker processes, started
by `keras-parallel launch --ps K`, bounded by a timeout."""

from __future__ import annotations

import os
import subprocess
import sys

from transparency import worker_results

TIMEOUT = 240


def launch(task, out, workers: int, ps: int, *args: str) -> list[dict]:
    """`python task out *args` in every task; what each worker saved."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-m", "keras_parallel", "launch", "--ps", str(ps)]
        + ["-n", str(workers), str(task), str(out), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Under --ps a lost worker does not fail the job: say which one.
    assert "lost:" not in done.stderr, done.stderr[-3000:]
    return worker_results(out, workers)
