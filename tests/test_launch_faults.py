"""`keras-parallel launch` when a task dies or stalls, on tiny
TensorFlow-free scripts: restarts, the parameter-server policy, and stalls
judged from progress files the scripts write as a strategy would
(`keras_parallel/step_progress.py`; with DataParallel:
tests/data_parallel/test_multi_worker_faults.py)."""

import pytest
from test_launch import LONG_SLEEP, assert_gone, run_launcher, write_script

from keras_parallel import launch
from keras_parallel.cli import main

# Every script starts with this: its job, index and restart count.
HEADER = """
import json, os, pathlib, signal, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
job, index = task["type"], task["index"]
count = int(os.environ["KERAS_PARALLEL_RESTART_COUNT"])
folder = pathlib.Path(sys.argv[1])


def wait_for(name):
    while not (folder / name).exists():
        time.sleep(0.05)


def mark(name):
    (folder / name).write_text(str(os.getpid()))


def wait_until_gone(name, once=False):
    pid = int((folder / name).read_text())
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if once:
            raise TimeoutError
        time.sleep(0.05)
"""


def reports(result) -> list[str]:
    prefix = "keras-parallel launch: "
    return [
        line[len(prefix) :]
        for line in result.stderr.splitlines()
        if line.startswith(prefix)
    ]


def launch_script(tmp_path, body: str, *options: str):
    script = write_script(tmp_path, HEADER + body)
    return run_launcher(*options, script, str(tmp_path))


def test_max_restarts_starts_every_worker_again_with_its_restart_count(tmp_path):
    result = launch_script(
        tmp_path,
        f"""
print("start", count)
if count == 0:
    if index == 1:
        wait_for("worker 0 up")
        sys.exit(3)
    mark("worker 0 up")
    time.sleep({LONG_SLEEP})  # until the launcher stops it
""",
        *("-n", "2", "--max-restarts", "2"),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "[worker 0] start 0",
        "[worker 0] start 1",
        "[worker 1] start 0",
        "[worker 1] start 1",
    ]
    assert reports(result) == [
        "worker 1 exited with code 3; stopping the other workers.",
        "restart 1 of 2 (worker 1 exited with code 3): starting all workers again.",
    ]


def test_when_restarts_run_out_the_failure_ends_the_job(tmp_path):
    result = launch_script(
        tmp_path,
        f"""
if index == 1:
    sys.exit(3)
time.sleep({LONG_SLEEP})
""",
        *("-n", "2", "--max-restarts", "1"),
    )
    assert result.returncode == 3, result.stderr
    assert reports(result) == [
        "worker 1 exited with code 3; stopping the other workers.",
        "restart 1 of 1 (worker 1 exited with code 3): starting all workers again.",
        "worker 1 exited with code 3; stopping the other workers.",
    ]


# Under --ps: worker 1 dies on its first attempt; worker 0 finishes after
# that (and after worker 1's second attempt, if there is one); the ps task
# serves until it is stopped.
PS_SCRIPT = f"""
if job == "ps":
    time.sleep({LONG_SLEEP})
elif index == 1:
    print("start", count)
    if count == 0:
        mark("worker 1 first")
        sys.exit(3)
    mark("worker 1 again")
else:
    print("start", count)
    wait_for("worker 1 first")
    wait_until_gone("worker 1 first")
    if sys.argv[2:] == ["again"]:
        wait_for("worker 1 again")
    print("finished")
"""


def test_under_ps_a_lost_worker_does_not_stop_the_others(tmp_path):
    script = write_script(tmp_path, HEADER + PS_SCRIPT)
    result = run_launcher("-n", "2", "--ps", "1", script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "[worker 0] finished",
        "[worker 0] start 0",
        "[worker 1] start 0",
    ]
    assert reports(result) == [
        "worker 1 exited with code 3; the other workers go on (parameter-server "
        "training is asynchronous).",
        "the other workers finished; lost: worker 1.",
    ]


def test_under_ps_a_restart_starts_the_lost_worker_alone(tmp_path):
    script = write_script(tmp_path, HEADER + PS_SCRIPT)
    result = run_launcher(
        *("-n", "2", "--ps", "1", "--max-restarts", "1"),
        *(script, str(tmp_path), "again"),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "[worker 0] finished",
        "[worker 0] start 0",
        "[worker 1] start 0",
        "[worker 1] start 1",
    ]
    assert reports(result) == [
        "worker 1 exited with code 3; the other workers go on (parameter-server "
        "training is asynchronous).",
        "restart 1 of 1 (worker 1 exited with code 3): starting worker 1 again.",
    ]


def test_a_ps_task_that_exits_stops_every_task(tmp_path):
    result = launch_script(
        tmp_path,
        f"""
if job == "ps":
    wait_for("worker 0")
    wait_for("worker 1")
    sys.exit(5)
mark(f"worker {{index}}")
time.sleep({LONG_SLEEP})
""",
        *("-n", "2", "--ps", "1"),
    )
    assert result.returncode == 5, result.stderr
    assert reports(result) == ["ps 0 exited with code 5; stopping the other workers."]
    for index in range(2):
        assert_gone(int((tmp_path / f"worker {index}").read_text()))


def test_a_script_without_parameter_server_under_ps_is_named(tmp_path):
    # No strategy at all: every task, the ps too, runs the script to its end.
    result = launch_script(
        tmp_path,
        f"""
if job == "worker":
    time.sleep({LONG_SLEEP})
""",
        *("-n", "2", "--ps", "1"),
    )
    assert result.returncode == 1, result.stderr
    (report,) = reports(result)
    assert report.startswith("ps 0 exited with code 0: a ps task serves the variables")
    assert "never created one" in report and "launch without --ps" in report


# Worker 1 finished 3 steps and sleeps between steps (in a callback); worker
# 0 waits inside step 4 for it.
STALL_SCRIPT = f"""
import faulthandler
from keras_parallel.progress import Progress, write_progress
faulthandler.register(signal.SIGUSR1, all_threads=True)
path = os.environ["KERAS_PARALLEL_PROGRESS_FILE"]
mark(f"worker {{index}}")
write_progress(path, Progress(3, 3) if index == 1 else Progress(4, 3))
time.sleep({LONG_SLEEP})
"""

# Under --ps: worker 1 is stuck inside step 4 (on a ps, say) while worker 0
# goes on, step after step, and finishes once worker 1 is stopped.
PS_STALL_SCRIPT = f"""
import faulthandler
from keras_parallel.progress import Progress, write_progress
if job == "ps":
    time.sleep({LONG_SLEEP})
    sys.exit()
faulthandler.register(signal.SIGUSR1, all_threads=True)
path = os.environ["KERAS_PARALLEL_PROGRESS_FILE"]
mark(f"worker {{index}}")
if index == 1:
    write_progress(path, Progress(4, 3))
    time.sleep({LONG_SLEEP})
wait_for("worker 1")
step = 0
while True:
    step += 1
    write_progress(path, Progress(step, step))
    try:
        wait_until_gone("worker 1", once=True)
    except TimeoutError:
        time.sleep(0.1)
        continue
    break
"""


def test_the_worker_furthest_behind_is_named_when_the_others_wait(tmp_path):
    result = launch_script(tmp_path, STALL_SCRIPT, "-n", "2", "--timeout", "1")
    assert result.returncode == 124, result.stderr
    said = reports(result)
    assert said[0].startswith("worker 1 is stalled: no progress for ")
    assert said[0].endswith(" s, not inside a step (last completed step 3).")
    assert said[1:] == [
        "worker 0 is waiting, inside step 4 (last completed step 3).",
        "the Python stacks of worker 0, worker 1 follow (SIGUSR1).",
        "stopping all workers.",
    ]
    # Each worker printed where its main thread was (the sleep).
    for index in range(2):
        assert f"[worker {index}] Current thread " in result.stderr
        assert_gone(int((tmp_path / f"worker {index}").read_text()))


def test_under_ps_a_stalled_worker_is_stopped_and_the_others_go_on(tmp_path):
    script = write_script(tmp_path, HEADER + PS_STALL_SCRIPT)
    result = run_launcher(
        *("-n", "2", "--ps", "1", "--timeout", "1"), script, str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    said = reports(result)
    assert said[0].startswith("worker 1 is stalled: no progress for ")
    assert said[0].endswith(" s, inside step 4 (last completed step 3).")
    assert said[1:] == [
        "the Python stacks of worker 1 follow (SIGUSR1).",
        "worker 1 stalled; the other workers go on (parameter-server training "
        "is asynchronous).",
        "the other workers finished; lost: worker 1.",
    ]


def test_workers_that_nobody_waits_for_are_not_stalled(tmp_path):
    # Worker 0 is between steps (saving, say), worker 1 made no strategy:
    # longer than the timeout, but nobody waits inside a step.
    result = launch_script(
        tmp_path,
        """
from keras_parallel.progress import Progress, write_progress
if index == 0:
    write_progress(os.environ["KERAS_PARALLEL_PROGRESS_FILE"], Progress(2, 2))
time.sleep(3)
print("done")
""",
        *("-n", "2", "--timeout", "1"),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["[worker 0] done", "[worker 1] done"]
    assert reports(result) == []


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-restarts", "-1", "argument --max-restarts: must be >= 0, got -1"),
        ("--timeout", "-2", "argument --timeout: must be >= 0 (0: never), got -2"),
        ("--timeout", "soon", "must be a number of seconds, got 'soon'"),
    ],
)
def test_bad_restarts_or_timeout_are_refused(tmp_path, capsys, option, value, message):
    script = write_script(tmp_path, "raise SystemExit('must not run')\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", option, value, script])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    keyword = option.lstrip("-").replace("-", "_")
    with pytest.raises(ValueError, match=f"{keyword} must be >= 0"):
        launch.launch(script, **{keyword: -1})
