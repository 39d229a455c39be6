"""`keras-parallel launch`: one training script as N TensorFlow workers on this host.

Each worker is `python script.py args...` with its own `TF_CONFIG`, so a script
whose `keras_parallel.DataParallel()` reads it (and then trains across the
workers) can be tried out on one machine before it runs on several. Standard
library only: the launcher must not pay for (or depend on) a TensorFlow import.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence

from keras_parallel.launch_supervision import Supervisor
from keras_parallel.launch_tasks import Task
from keras_parallel.progress import (
    PROGRESS_FILE,
    RESTART_COUNT,
    STALL_TIMEOUT,
    ProgressWatch,
)
from keras_parallel.worker_process import PrivateNetwork, worker_command

NETWORKS = ("private", "host")
HOST = "127.0.0.1"
GRACE_PERIOD = 10.0
# Seconds without progress (while somebody waits inside a step) after which
# the job is stalled: generous, for the first step's tracing and compiling.
TIMEOUT = 900.0
_READER_JOIN_TIMEOUT = 5.0


def tf_config(
    num_workers: int,
    index: int,
    ports: Sequence[int],
    num_ps: int = 0,
    task_type: str = "worker",
) -> dict:
    """The `TF_CONFIG` of task `index` in a cluster of local workers.

    Args:
        num_workers: number of workers in the cluster.
        index: this task's index in its job.
        ports: one port on `127.0.0.1` per task: worker `i` listens on
            `ports[i]`, parameter server `k` on `ports[num_workers + k]`.
        num_ps: number of parameter-server (`ps`) tasks.
        task_type: `"worker"` or `"ps"`.

    Returns:
        A dict to be serialised with `json.dumps` into the `TF_CONFIG`
        environment variable.

    Example:

    ```python
    os.environ["TF_CONFIG"] = json.dumps(tf_config(2, 1, [2000, 2001]))
    # {"cluster": {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]},
    #  "task": {"type": "worker", "index": 1}}
    ```
    """
    if len(ports) != num_workers + num_ps:
        raise ValueError(
            f"need {num_workers + num_ps} ports, got {len(ports)}: {list(ports)}"
        )
    count = num_ps if task_type == "ps" else num_workers
    if not 0 <= index < count:
        raise ValueError(f"index must be in [0, {count}), got {index}")
    addresses = [f"{HOST}:{port}" for port in ports]
    cluster = {"worker": addresses[:num_workers]}
    if num_ps:
        cluster["ps"] = addresses[num_workers:]
    return {"cluster": cluster, "task": {"type": task_type, "index": index}}


def launch(
    script: str,
    args: Sequence[str] = (),
    num_workers: int = 2,
    port: int | None = None,
    grace_period: float = GRACE_PERIOD,
    network: str = "private",
    num_ps: int = 0,
    max_restarts: int = 0,
    timeout: float = TIMEOUT,
) -> int:
    """Runs `script` as `num_workers` local workers and waits for all of them.

    Every line a worker writes is echoed with a `[worker i] ` prefix, its
    stdout to this process's stdout and its stderr to stderr. The workers live
    and die together: when one exits non-zero or is killed, the others get
    SIGTERM (SIGKILL after `grace_period` seconds) and, while restarts are
    left, they all start again, so that
    `keras_parallel.callbacks.BackupAndRestore` resumes from the last
    finished epoch. Each task finds how often it was started before in the
    environment variable `KERAS_PARALLEL_RESTART_COUNT` (0 the first time).
    SIGINT and SIGTERM sent to this process are forwarded to the workers in
    the same way, which makes Ctrl-C a `KeyboardInterrupt` in each of them. On
    Linux the kernel stops the workers when the launcher dies, even by
    SIGKILL.

    A worker that stops making progress (asleep in a callback, stuck in a
    file system call) leaves the others waiting inside their next step. A
    `keras_parallel.DataParallel` in each worker reports the steps it begins
    and finishes to the launcher; when somebody waits inside a step and no
    worker's count changed for `timeout` seconds, the launcher names the
    worker furthest behind and its last completed step, has every worker
    print its Python stacks (SIGUSR1, `faulthandler`) to its stderr, and
    stops the workers (or restarts them, as for a death). Workers whose
    script makes no DataParallel are never judged stalled.

    With parameter servers (`num_ps`), training is asynchronous: a worker
    that dies or stalls is reported and the others go on (with restarts left
    it alone starts again), and the job succeeds when the other workers
    finish. A `ps` task that exits while workers train stops every task (or
    restarts them all).

    TensorFlow's servers listen on every interface and run whatever graph a
    client sends them, so by default the workers share a private network
    whose only interface is loopback: they reach each other, and no other
    machine reaches them (nor do they reach the internet). Where the kernel
    does not allow that, a warning names the open ports before any worker
    starts.

    Args:
        script: path of the Python script to run in each worker.
        args: command-line arguments for the script.
        num_workers: number of workers, at least 1.
        port: worker `i` listens on `port + i`; `None` picks free ports.
        grace_period: seconds a stopped worker gets to exit before SIGKILL.
        network: `"private"` (the default: loopback only, isolated from other
            hosts) or `"host"` (this machine's network, for a script that must
            download something; every worker's port is open to the network).
        num_ps: parameter-server tasks to start besides the workers (for
            `keras_parallel.ParameterServer`): each runs the script with a
            `ps` TF_CONFIG, and is stopped once every worker is done.
        max_restarts: how many times in all a failed or stalled job (under
            parameter servers: a failed or stalled worker) is started again;
            0, the default, never.
        timeout: seconds without progress after which waiting workers are
            stalled (default 900: long enough for a large model's first
            step to trace and compile); 0 never.

    Returns:
        The exit code for the launcher: 0 when every worker exited 0 (under
        parameter servers: when the workers not lost did), else the code of
        the failure that ended the job (128 + N for death by signal N, 124
        for a stall), or 128 + N when signal N stopped the launcher itself
        (130 for Ctrl-C).

    Example:

    ```python
    sys.exit(launch("train.py", ["--epochs", "3"], num_workers=2, max_restarts=3))
    ```
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not os.path.isfile(script):
        raise ValueError(f"script {script!r} does not exist or is not a file.")
    if network not in NETWORKS:
        raise ValueError(
            f"network must be one of {', '.join(map(repr, NETWORKS))}, got {network!r}."
        )
    if num_ps < 0:
        raise ValueError(f"the number of ps tasks must be >= 0, got {num_ps}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds (0: never), got {timeout}")
    names = [("worker", i) for i in range(num_workers)]
    names += [("ps", k) for k in range(num_ps)]
    ports = free_ports(len(names)) if port is None else _port_range(port, names)
    private = _private_network(ports) if network == "private" else None
    if private is None:
        if network == "host":
            _warn_open(ports, "--network host was given")
        for (job, index), candidate in zip(names, ports, strict=True):
            _check_port(candidate, f"{job} {index}")

    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {
        signum: signal.signal(signum, record)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    lock = threading.Lock()
    offline = threading.Event() if private else None
    tasks = [Task(job, index, lock, offline) for job, index in names]
    watch = ProgressWatch(timeout, independent=num_ps > 0)
    folder = tempfile.mkdtemp(prefix="keras-parallel-launch-")

    def start(task: Task) -> None:
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                tf_config(num_workers, task.index, ports, num_ps, task.job)
            ),
            "PYTHONUNBUFFERED": "1",
            RESTART_COUNT: str(task.starts),
            STALL_TIMEOUT: str(timeout),
        }
        if task.job == "worker":
            env[PROGRESS_FILE] = os.path.join(folder, f"worker_{task.index}")
            watch.started(task.index, env[PROGRESS_FILE])
        task.start(
            worker_command(script, args, private),
            env,
            private.fds if private else (),
        )

    try:
        for task in tasks:
            start(task)
        code = Supervisor(
            tasks, start, watch, received, grace_period, max_restarts, lock
        ).run()
    finally:
        if private:
            private.close()
        # Reached with tasks still running only if the launcher itself failed.
        for task in tasks:
            task.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(folder, ignore_errors=True)
    # A grandchild that inherited a pipe may keep it open: don't wait forever.
    for task in tasks:
        for reader in task.readers:
            reader.join(_READER_JOIN_TIMEOUT)
    if code and offline is not None and offline.is_set():
        print(
            "keras-parallel launch: a worker could not reach the network. The "
            "workers share a private network with loopback only (README, "
            "'Security'): download what the script needs before launching, or "
            "run with --network host.",
            file=sys.stderr,
            flush=True,
        )
    return code


def _private_network(ports: Sequence[int]) -> PrivateNetwork | None:
    try:
        return PrivateNetwork()
    except OSError as error:
        _warn_open(ports, f"no private network could be made ({error})")
        return None


def _warn_open(ports: Sequence[int], reason: str) -> None:
    print(
        f"keras-parallel launch: WARNING: {reason}, so the workers' TensorFlow "
        f"servers listen on ALL network interfaces, ports {', '.join(map(str, ports))}."
        " TensorFlow runs any graph a client sends to them, without "
        "authentication: anyone who can reach this machine on those ports can "
        "run code as you. Block them with a firewall or train only on a trusted "
        "network (README, 'Security').",
        file=sys.stderr,
        flush=True,
    )


def free_ports(count: int) -> list[int]:
    """`count` different ports on 127.0.0.1 that nothing listens on now.

    All sockets stay bound until every port is chosen, so the ports differ.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_range(port: int, tasks: list[tuple[str, int]]) -> list[int]:
    count = len(tasks)
    if not 1 <= port <= 65536 - count:
        ps = " and the ps tasks the ports after" if tasks[-1][0] == "ps" else ""
        raise ValueError(
            f"--port must be between 1 and {65536 - count} for {count} "
            f"worker(s) (worker i uses port + i{ps}), got {port}."
        )
    return list(range(port, port + count))


def _check_port(port: int, task: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the workers' gRPC servers do, so that a port left in TIME_WAIT by
        # the previous run does not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as error:
            raise ValueError(
                f"port {port} ({task}) on {HOST} is in use. Pick another "
                "base port with --port, or leave --port out to choose free ports."
            ) from error
