"""`keras-parallel launch`: one training script as N TensorFlow workers on this host.

Each worker is `python script.py args...` with its own `TF_CONFIG`, so a script
whose `keras_parallel.DataParallel()` reads it (and then trains across the
workers) can be tried out on one machine before it runs on several. Standard
library only: the launcher must not pay for (or depend on) a TensorFlow import.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from keras_parallel.worker_process import PrivateNetwork, worker_command

NETWORKS = ("private", "host")
# What a worker prints when it tries to reach the internet from the private
# network (name lookups fail first; a literal address is unreachable).
_OFFLINE_ERRORS = (
    "temporary failure in name resolution",
    "name or service not known",
    "no address associated with hostname",
    "network is unreachable",
)
HOST = "127.0.0.1"
GRACE_PERIOD = 10.0
_POLL_INTERVAL = 0.1
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
) -> int:
    """Runs `script` as `num_workers` local workers and waits for all of them.

    Every line a worker writes is echoed with a `[worker i] ` prefix, its
    stdout to this process's stdout and its stderr to stderr. The workers live
    and die together: when one exits non-zero or is killed, the others get
    SIGTERM (SIGKILL after `grace_period` seconds). SIGINT and SIGTERM sent to
    this process are forwarded to the workers in the same way, which makes
    Ctrl-C a `KeyboardInterrupt` in each of them. On Linux the kernel stops
    the workers when the launcher dies, even by SIGKILL.

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
            `ps` TF_CONFIG, and is stopped once every worker has exited 0.

    Returns:
        The exit code for the launcher: 0 when every worker exited 0, else the
        code of the first worker that failed (128 + N for death by signal N),
        or 128 + N when signal N stopped the launcher itself (130 for Ctrl-C).

    Example:

    ```python
    sys.exit(launch("train.py", ["--epochs", "3"], num_workers=2))
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
    tasks = [("worker", i) for i in range(num_workers)]
    tasks += [("ps", k) for k in range(num_ps)]
    ports = free_ports(len(tasks)) if port is None else _port_range(port, tasks)
    private = _private_network(ports) if network == "private" else None
    if private is None:
        if network == "host":
            _warn_open(ports, "--network host was given")
        for (job, index), candidate in zip(tasks, ports, strict=True):
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
    workers: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    try:
        for job, index in tasks:
            config = tf_config(num_workers, index, ports, num_ps, job)
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(config),
                "PYTHONUNBUFFERED": "1",
            }
            worker = subprocess.Popen(
                worker_command(script, args, private),
                pass_fds=private.fds if private else (),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Only the launcher forwards signals, so a terminal's Ctrl-C
                # reaches each worker exactly once.
                start_new_session=True,
            )
            workers.append(worker)
            prefix = f"[{job} {index}] "
            for pipe, out in ((worker.stdout, sys.stdout), (worker.stderr, sys.stderr)):
                reader = threading.Thread(
                    target=_echo,
                    args=(pipe, out, prefix, lock, offline),
                    daemon=True,
                )
                reader.start()
                readers.append(reader)
        code = _supervise(workers, tasks, received, grace_period, lock)
    finally:
        if private:
            private.close()
        # Reached with workers still running only if the launcher itself failed.
        for worker in workers:
            if worker.poll() is None:
                _signal(worker, signal.SIGKILL)
                worker.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A grandchild that inherited a pipe may keep it open: don't wait forever.
    for reader in readers:
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


def _supervise(
    workers: list[subprocess.Popen],
    tasks: list[tuple[str, int]],
    received: list[int],
    grace_period: float,
    lock: threading.Lock,
) -> int:
    """Waits for the workers; a parameter server only serves them, so it is
    stopped once they are all done, and its exit before that is a failure."""
    while True:
        if received:
            signum = received[0]
            _stop(workers, signum, grace_period, received)
            return 128 + signum
        codes = [worker.poll() for worker in workers]
        for (job, index), code in zip(tasks, codes, strict=True):
            if code is not None and (code != 0 or job == "ps"):
                running = any(other is None for other in codes)
                with lock:
                    print(
                        f"keras-parallel launch: {job} {index} {_describe(code)}"
                        + ("; stopping the other workers." if running else "."),
                        file=sys.stderr,
                        flush=True,
                    )
                _stop(workers, signal.SIGTERM, grace_period, received)
                return 128 - code if code < 0 else code or 1
        if all(
            code == 0
            for (job, _), code in zip(tasks, codes, strict=True)
            if job != "ps"
        ):
            _stop(workers, signal.SIGTERM, grace_period, received)
            return 0
        time.sleep(_POLL_INTERVAL)


def _stop(
    workers: list[subprocess.Popen],
    signum: int,
    grace_period: float,
    received: list[int],
) -> None:
    """Sends `signum` to running workers; SIGKILL after the grace period.

    Another SIGINT or SIGTERM to the launcher while waiting cuts the grace
    period short, so a second Ctrl-C always ends the run at once.
    """
    for worker in workers:
        if worker.poll() is None:
            _signal(worker, signum)
    signals_seen = len(received)
    deadline = time.monotonic() + grace_period
    while any(worker.poll() is None for worker in workers):
        if time.monotonic() >= deadline or len(received) > signals_seen:
            for worker in workers:
                if worker.poll() is None:
                    _signal(worker, signal.SIGKILL)
                    worker.wait()
            return
        time.sleep(_POLL_INTERVAL)


def _signal(worker: subprocess.Popen, signum: int) -> None:
    # Each worker leads its own process group (start_new_session): signalling
    # the group also reaches its children, as a terminal's Ctrl-C would.
    try:
        os.killpg(worker.pid, signum)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def _echo(
    pipe: IO[bytes],
    out: IO[str],
    prefix: str,
    lock: threading.Lock,
    offline: threading.Event | None,
) -> None:
    with pipe:
        for line in iter(pipe.readline, b""):
            text = line.decode(errors="replace")
            if offline is not None and any(
                error in text.lower() for error in _OFFLINE_ERRORS
            ):
                offline.set()
            with lock:
                try:
                    out.write(prefix + text + ("" if text.endswith("\n") else "\n"))
                    out.flush()
                except (OSError, ValueError):
                    # Keep draining even when our own output is gone (say,
                    # `| head`): an undrained pipe would block the worker.
                    pass


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
