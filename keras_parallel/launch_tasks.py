"""One process of a launched cluster (`Task`): started, restarted, signalled
and stopped, its output echoed with a `[worker i] ` prefix.

Standard library only, as the launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

_POLL_INTERVAL = 0.1
# What a worker prints when it tries to reach the internet from the private
# network (name lookups fail first; a literal address is unreachable).
_OFFLINE_ERRORS = (
    "temporary failure in name resolution",
    "name or service not known",
    "no address associated with hostname",
    "network is unreachable",
)


class Task:
    """A `worker` or `ps` task: its current process and how often it ran.

    Args:
        job: `"worker"` or `"ps"`.
        index: the task's index in its job.
        lock: held while a line is echoed, so lines never interleave.
        offline: set when a line says the network is unreachable (None: not
            watched).
    """

    def __init__(
        self,
        job: str,
        index: int,
        lock: threading.Lock,
        offline: threading.Event | None,
    ):
        self.job = job
        self.index = index
        self.name = f"{job} {index}"
        self.starts = 0
        self.process: subprocess.Popen | None = None
        # Its last exit code once the launcher has dealt with that exit.
        self.outcome: int | None = None
        self.readers: list[threading.Thread] = []
        self._lock = lock
        self._offline = offline

    def start(self, command: list[str], env: dict, pass_fds: Sequence[int]) -> None:
        """Starts (or starts again) the task's process."""
        self.outcome = None
        self.process = subprocess.Popen(
            command,
            pass_fds=pass_fds,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Only the launcher forwards signals, so a terminal's Ctrl-C
            # reaches each worker exactly once.
            start_new_session=True,
        )
        self.starts += 1
        prefix = f"[{self.name}] "
        for pipe, out in (
            (self.process.stdout, sys.stdout),
            (self.process.stderr, sys.stderr),
        ):
            reader = threading.Thread(
                target=_echo,
                args=(pipe, out, prefix, self._lock, self._offline),
                daemon=True,
            )
            reader.start()
            self.readers.append(reader)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int, group: bool = True) -> None:
        """Sends `signum` to the task's process group (or its process only)."""
        if not self.running:
            return
        try:
            # Each task leads its own process group (start_new_session):
            # signalling the group also reaches its children, as a
            # terminal's Ctrl-C would.
            if group:
                os.killpg(self.process.pid, signum)
            else:
                os.kill(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.running:
            self.signal(signal.SIGKILL)
            self.process.wait()


def stop(
    tasks: Sequence[Task],
    signum: int,
    grace_period: float,
    interrupted: Callable[[], bool],
) -> None:
    """Sends `signum` to the running tasks; SIGKILL after the grace period
    or as soon as `interrupted()` (a second Ctrl-C ends the run at once)."""
    for task in tasks:
        task.signal(signum)
    deadline = time.monotonic() + grace_period
    while any(task.running for task in tasks):
        if time.monotonic() >= deadline or interrupted():
            for task in tasks:
                task.kill()
            return
        time.sleep(_POLL_INTERVAL)


def describe_exit(code: int) -> str:
    """`code` as `Popen.returncode` gives it, in words."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def exit_code(code: int) -> int:
    """A failed task's `returncode` as the launcher's exit code (128 + N for
    death by signal N, 1 for a parameter server that exited 0 too early)."""
    return 128 - code if code < 0 else code or 1


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
