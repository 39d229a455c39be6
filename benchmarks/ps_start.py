"""How often a ParameterServer job loses a process while its workers start.

TensorFlow 2.21's eager service replaced its collective executor manager when
a client connected to a server holding none, so two workers connecting to a
ps task at once freed the manager the first one's context still used, and the
ps crashed (SIGSEGV) at that context's next new kernel: about one launch of
1 ps + 3 workers in 15. A ps task now serves from a context of its own
(`keras_parallel/parameter_server/cluster.py::serve`). This starts such jobs
again and again with `keras-parallel launch --ps 1 -n 3` (each worker fits a
small MLP for one epoch) and counts the launches that did not end with every
process finishing.

Usage:
    python benchmarks/ps_start.py [--launches 40]   # results/ps_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess

from launched import LAUNCHER, REPORT_PREFIX, cluster_env

RESULTS = pathlib.Path(__file__).with_name("results") / "ps_start.json"
WORKERS = 3
# The launcher's report of a task that ended early ("ps 0 was killed by SIGSEGV").
REPORT = re.compile(REPORT_PREFIX + r"((?:ps|worker) \d+ [^;\n]*)")


def worker() -> None:
    """The task every process of the launched cluster runs."""
    import keras
    import numpy as np

    import keras_parallel

    strategy = keras_parallel.ParameterServer()
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    model.fit(x, x.sum(1, keepdims=True), batch_size=32, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=40)
    launches = parser.parse_args().launches
    env = cluster_env()
    failed = []
    for k in range(launches):
        done = subprocess.run(
            [*LAUNCHER, "--ps", "1", "-n", str(WORKERS), __file__],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        lost = REPORT.findall(done.stderr)
        if done.returncode != 0 or lost:
            failed.append({"launch": k, "returncode": done.returncode, "reports": lost})
        print(f"launch {k + 1}/{launches}: rc {done.returncode} {lost}", flush=True)
    results = {"launches": launches, "workers": WORKERS, "ps": 1, "failed": failed}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(failed)} of {launches} launches lost a process")


if __name__ == "__main__":
    if "TF_CONFIG" in os.environ:
        worker()
    else:
        main()
