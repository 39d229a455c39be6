"""Runs a task script on a local cluster of ps and worker processes, started
by `keras-parallel launch --ps K`, bounded by a timeout."""

from __future__ import annotations

from conftest import launch_task
from transparency import worker_results


def launch(task, out, workers: int, ps: int, *args: str) -> list[dict]:
    """`python task out *args` in every task; what each worker saved."""
    done = launch_task(task, out, *args, workers=workers, options=("--ps", str(ps)))
    assert done.returncode == 0, done.stderr[-3000:]
    # Under --ps a lost worker does not fail the job: say which one.
    assert "lost:" not in done.stderr, done.stderr[-3000:]
    return worker_results(out, workers)
