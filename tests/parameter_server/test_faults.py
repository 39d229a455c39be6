"""ParameterServer when a task dies: a worker killed mid-`fit` does not stop
the others and rejoins when started again; a ps killed ends every worker
with an error naming it, and BackupAndRestore resumes the restarted job.

Processes are started by hand with `TF_CONFIG` (as a cluster manager would)
and bounded by timeouts; the times from a kill to its report are printed,
not asserted."""

import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
from conftest import cluster_env, launch_task
from faults_task import COUNT_BATCH, COUNT_SAMPLES
from ps_task import train
from test_launch_faults import reports as launcher_reports
from transparency import max_difference, saved_weights

from keras_parallel.launch import free_ports

TASK = pathlib.Path(__file__).with_name("faults_task.py")
TIMEOUT = 240
# Seconds without a heartbeat after which a worker counts as stopped.
WORKER_TIMEOUT = "6"
LOST_PS = "keras_parallel.parameter_server.lost_ps.ParameterServerLostError: "


class Cluster:
    """ps and worker processes of one cluster, each writing `<out>/<name>.log`
    and `.err`."""

    def __init__(self, out: pathlib.Path, workers: int):
        ports = free_ports(workers + 1)
        self.out = out
        self.spec = {
            "ps": [f"127.0.0.1:{ports[0]}"],
            "worker": [f"127.0.0.1:{p}" for p in ports[1:]],
        }
        self.processes = []

    def start(self, kind, index, *args, name=None):
        env = cluster_env(
            KERAS_PARALLEL_PS_WORKER_TIMEOUT=WORKER_TIMEOUT,
            TF_CONFIG=json.dumps(
                {"cluster": self.spec, "task": {"type": kind, "index": index}}
            ),
        )
        name = name or f"{kind}_{index}"
        with (
            open(self.out / f"{name}.log", "w") as log,
            open(self.out / f"{name}.err", "w") as err,
        ):
            process = subprocess.Popen(
                [sys.executable, str(TASK), str(self.out), *args, "--name", name],
                stdout=log,
                stderr=err,
                env=env,
            )
        process.name = name
        self.processes.append(process)
        return process

    def output(self, process) -> tuple[str, str]:
        return tuple(
            (self.out / f"{process.name}.{kind}").read_text() for kind in ("log", "err")
        )

    def stop(self):
        for process in self.processes:
            process.kill()
            process.wait()


def _wait_for(condition) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def exited(*processes, timeout=TIMEOUT) -> list[float]:
    """Waits for `processes`; the time each exited."""
    deadline, ended = time.monotonic() + timeout, {}
    while len(ended) < len(processes):
        for process in processes:
            if process not in ended and process.poll() is not None:
                ended[process] = time.time()
        assert time.monotonic() < deadline, "a process did not end in time"
        time.sleep(0.05)
    return [ended[process] for process in processes]


def test_killed_worker_does_not_stop_the_other_and_rejoins(tmp_path):
    cluster = Cluster(tmp_path, workers=2)
    epochs, steps = 6, COUNT_SAMPLES // COUNT_BATCH
    try:
        cluster.start("ps", 0, "count")
        first = cluster.start(
            "worker", 0, "count", "--epochs", str(epochs), "--hold-at", "2"
        )
        dying = cluster.start(
            "worker",
            1,
            "count",
            "--epochs",
            str(epochs),
            "--die-at",
            "1:2",
            name="worker_1_killed",
        )
        exited(dying)
        assert dying.returncode == -9, cluster.output(dying)[1][-3000:]
        _wait_for(lambda: "worker 1 stopped" in cluster.output(first)[1])
        # Started again with the same TF_CONFIG while worker 0 trains on.
        again = cluster.start(
            "worker", 1, "count", "--epochs", str(epochs), "--announce"
        )
        exited(first, again)
    finally:
        cluster.stop()
    log, err = cluster.output(first)
    assert first.returncode == 0, err[-3000:]
    assert again.returncode == 0, cluster.output(again)[1][-3000:]
    died = re.search(r"dying after (\d+) updates at ([\d.]+)", cluster.output(dying)[0])
    killed_updates, killed_at = int(died[1]), float(died[2])
    assert killed_updates == steps + 2  # epoch 0, then batches 0 and 1 of epoch 1
    # Worker 0 reported worker 1 once when it stopped, and once when it came
    # back.
    stopped = re.findall(
        r"\[([\d.]+)\] UserWarning: keras_parallel.ParameterServer: worker 1 "
        r"stopped after (\d+) updates",
        err,
    )
    assert len(stopped) == 1, err[-3000:]
    assert int(stopped[0][1]) <= killed_updates
    assert err.count("worker 1 is back") == 1, err[-3000:]
    result = {n: np.load(tmp_path / f"worker_{n}.npz") for n in (0, 1)}
    assert int(result[0]["updates"]) == int(result[1]["updates"]) == epochs * steps
    # Worker 0's meetings waited for the worker started again: it joined
    # three epochs later, and worker 0's first meeting with it met the one
    # where Keras' fit reads a batch to build the model; so when worker 0's
    # fit ended, that worker had finished all but its last four epochs.
    assert int(result[0]["total_updates"]) >= (
        2 * epochs * steps + killed_updates - 4 * steps
    )
    # The worker started again finished last (its meetings waited for worker
    # 0 to end): every update of the three processes reached the variables,
    # which nobody initialised again.
    total = int(result[1]["total_updates"])
    assert total == 2 * epochs * steps + killed_updates
    np.testing.assert_array_equal(result[1]["kernel"], np.full((4, 1), -0.5 * total))
    print(
        f"\nworker 1 killed -> worker 0 continued without it: "
        f"{float(stopped[0][0]) - killed_at:.1f} s (timeout {WORKER_TIMEOUT} s)"
    )


def _kill_ps_when_ready(cluster, ps, worker_index):
    _wait_for((cluster.out / f"ready_{worker_index}").exists)
    ps.kill()
    return time.time()


def test_killed_ps_ends_every_worker_with_an_error_naming_it(tmp_path):
    backup = ("--backup", str(tmp_path / "backup"))
    cluster = Cluster(tmp_path, workers=2)
    try:
        ps = cluster.start("ps", 0, "mlp")
        # Worker 0 is slow, so worker 1 waits for it in meetings. Worker 0
        # catches the error of its step and then blocks, as a TensorFlow
        # operation on the lost ps can: its report comes from the ps watch.
        workers = [
            cluster.start(
                "worker",
                0,
                "mlp",
                "--slow",
                "0.1",
                "--signal-at",
                "1:3",
                "--swallow",
                *backup,
            ),
            cluster.start("worker", 1, "mlp", *backup),
        ]
        killed_at = _kill_ps_when_ready(cluster, ps, 0)
        # Each worker ends on its own, not at a 600 s timeout.
        ended = [t - killed_at for t in exited(*workers, timeout=60)]
    finally:
        cluster.stop()
    for worker in workers:
        err = cluster.output(worker)[1]
        assert worker.returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(LOST_PS + "Parameter server ps 0 (127.0.0.1:"), last
        assert "BackupAndRestore" in last
    print(f"\nps killed -> workers ended: {ended[0]:.1f} s, {ended[1]:.1f} s")
    # The whole job started again: worker 0 restores the variables it made
    # afresh, worker 1 only the epoch; both run the last two epochs alone.
    again = Cluster(tmp_path, workers=2)
    try:
        again.start("ps", 0, "mlp")
        workers = [again.start("worker", i, "mlp", *backup) for i in range(2)]
        exited(*workers)
    finally:
        again.stop()
    results = [dict(np.load(tmp_path / f"worker_{i}.npz")) for i in range(2)]
    for worker, result in zip(workers, results, strict=True):
        assert worker.returncode == 0, again.output(worker)[1][-3000:]
        assert result["epochs"].tolist() == [1, 2]
    first, second = (saved_weights(result) for result in results)
    assert max_difference(first, second) == 0.0
    assert not (tmp_path / "backup").exists()  # deleted once, at the end


def test_backup_and_restore_resumes_after_the_ps_is_killed(tmp_path):
    backup, epochs = str(tmp_path / "backup"), 3
    first = Cluster(tmp_path, workers=1)
    try:
        ps = first.start("ps", 0, "mlp")
        worker = first.start(
            "worker",
            0,
            "mlp",
            "--epochs",
            str(epochs),
            "--backup",
            backup,
            "--slow",
            "0.05",
            "--signal-at",
            "2:1",
            name="killed",
        )
        killed_at = _kill_ps_when_ready(first, ps, 0)
        (ended,) = exited(worker, timeout=60)
        ended -= killed_at
    finally:
        first.stop()
    err = first.output(worker)[1]
    assert worker.returncode == 1
    assert err.strip().splitlines()[-1].startswith(LOST_PS), err[-3000:]
    # The whole job started again resumes after the last finished epoch.
    second = Cluster(tmp_path, workers=1)
    try:
        second.start("ps", 0, "mlp")
        worker = second.start(
            "worker", 0, "mlp", "--epochs", str(epochs), "--backup", backup
        )
        exited(worker)
    finally:
        second.stop()
    assert worker.returncode == 0, second.output(worker)[1][-3000:]
    result = dict(np.load(tmp_path / "worker_0.npz"))
    assert result["epochs"].tolist() == [2]
    model, history = train(epochs=epochs)
    assert max_difference(saved_weights(result), model.get_weights()) <= 1e-5
    np.testing.assert_allclose(result["loss"], history.history["loss"][2:], rtol=1e-5)
    print(f"\nps killed -> the one worker ended: {ended:.1f} s")


def test_launcher_names_a_worker_asleep_in_a_callback(tmp_path):
    # Worker 1 sleeps at the end of epoch 0; worker 0 trains epoch 1 alone
    # and then waits for it in the meeting that starts epoch 2. The launcher
    # stops worker 1; worker 0, whose meeting drops it, finishes alone. The
    # timeout leaves a worker room to start on a loaded machine (with 5 s, a
    # worker still importing TensorFlow while the other waited in the first
    # meeting was once named stalled).
    done = launch_task(
        *(TASK, tmp_path, "mlp", "--stall", "1:0"),
        options=("--ps", "1", "--timeout", "30"),
        KERAS_PARALLEL_PS_WORKER_TIMEOUT="2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[worker 1] stalling after epoch 0" in done.stdout
    reports = launcher_reports(done)
    assert re.fullmatch(
        r"worker 1 is stalled: no progress for \d+ s, not "
        r"inside a step \(last completed step \d+\)\.",
        reports[0],
    ), reports
    assert reports[1:] == [
        "the Python stacks of worker 1 follow (SIGUSR1).",
        "worker 1 stalled; the other workers go on "
        "(parameter-server training is asynchronous).",
        "the other workers finished; lost: worker 1.",
    ], reports
    assert any(
        line.startswith("[worker 1]   File") and "in on_epoch_end" in line
        for line in done.stderr.splitlines()
    ), done.stderr[-3000:]
    assert dict(np.load(tmp_path / "worker_0.npz"))["epochs"].tolist() == [0, 1, 2]
