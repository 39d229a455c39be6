"""DataParallel on two launched workers when one of them crashes or stalls:
`launch --max-restarts` starts them again and BackupAndRestore resumes,
`launch --timeout` names the stalled worker from the steps the strategy
counted, and without the launcher the strategy's own collective timeout ends
the job naming the stalled worker (the launcher's policy on TensorFlow-free
scripts: tests/test_launch_faults.py)."""

import re

import pytest
from test_launch_faults import reports as launcher_reports
from test_multi_worker import TASK, _launch, _results, _weights, reference  # noqa: F401
from transparency import devices
from transparency import max_difference as _max_difference

import keras_parallel


def test_max_restarts_restarts_all_workers_and_the_backup_resumes(
    tmp_path,
    reference,  # noqa: F811
):
    backup = tmp_path / "backup"
    done = _launch(
        tmp_path / "out",
        *("--backup", str(backup), "--exit-at", "1:2:1"),
        options=("--max-restarts", "2"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Worker 1 left in the middle of epoch 2 (0-based), on the first attempt.
    assert "[worker 1] exiting at epoch 2, batch 1" in done.stdout
    reports = launcher_reports(done)
    assert reports == [
        "worker 1 exited with code 3; stopping the other workers.",
        "restart 1 of 2 (worker 1 exited with code 3): starting all workers again.",
    ]
    first, second = _results(tmp_path / "out")
    # Both were started again (they know it) and resumed after the last
    # finished epoch: only epoch 2 ran again.
    assert int(first["restart_count"]) == int(second["restart_count"]) == 1
    assert first["epochs"].tolist() == second["epochs"].tolist() == [2]
    assert not backup.exists()  # deleted at the end, once
    assert _max_difference(_weights(first), _weights(second)) == 0.0
    assert _max_difference(_weights(first), reference[0]) <= 1e-5


def test_a_worker_asleep_in_a_callback_is_named_with_its_last_step(tmp_path):
    # Worker 1 sleeps after batch 2 (its 3rd step); worker 0 waits inside its
    # 4th step, in the step's collective. Neither makes progress.
    done = _launch(tmp_path, "--stall-at", "1:0:2", options=("--timeout", "5"))
    assert done.returncode == 124, done.stderr[-3000:]
    assert "[worker 1] stalling after epoch 0, batch 2" in done.stdout
    reports = launcher_reports(done)
    assert re.fullmatch(
        r"worker 1 is stalled: no progress for \d+ s, not "
        r"inside a step \(last completed step 3\)\.",
        reports[0],
    ), reports
    assert reports[1:] == [
        "worker 0 is waiting, inside step 4 (last completed step 3).",
        "the Python stacks of worker 0, worker 1 follow (SIGUSR1).",
        "stopping all workers.",
    ]
    # Worker 1's main thread was in the callback, worker 0's in Keras' step.
    stacks = done.stderr.splitlines()
    assert any(
        line.startswith("[worker 1]   File") and "in on_train_batch_end" in line
        for line in stacks
    ), done.stderr[-3000:]
    assert any(
        line.startswith("[worker 0]   File")
        and "trainer.py" in line
        and line.endswith(" in function")
        for line in stacks
    ), done.stderr[-3000:]


def test_without_the_launcher_a_waiting_worker_names_the_stalled_one(tmp_path):
    # The launcher does not judge (--timeout 0): worker 0, inside its 4th
    # step for 3 s, reads worker 1's step counts from TensorFlow's
    # coordination service and fails its step naming it.
    done = _launch(
        tmp_path / "out",
        *("--stall-at", "1:0:2", "--collective-timeout", "3"),
        options=("--timeout", "0"),
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "keras-parallel launch: worker 0 exited with code 1" in done.stderr
    last_line = [
        line for line in done.stderr.splitlines() if line.startswith("[worker 0] ")
    ][-1]
    assert last_line.startswith(
        "[worker 0] keras_parallel.data_parallel.collective_watch.StalledWorkerError: "
        "worker 0 waited 3 s inside step 4 for the other workers (DataParallel's "
        "collective_timeout). Behind it: worker 1 (/job:worker/replica:0/task:1), "
        "not inside a step (last completed step 3)."
    ), done.stderr[-3000:]


@pytest.mark.parametrize("seconds", [0, -1, "60", True])
def test_collective_timeout_must_be_positive_seconds_or_none(seconds):
    with pytest.raises(ValueError, match=re.escape(f"collective_timeout={seconds!r}")):
        keras_parallel.DataParallel(devices(2), collective_timeout=seconds)
