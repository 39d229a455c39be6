"""What `keras-parallel launch` does while its tasks run: when one exits,
dies or stalls, whom it stops, whom it starts again, and its exit code.

Synchronous training (no `ps` task) cannot go on without any of its workers,
so a worker that dies or stalls stops them all; with restarts left they all
start again, and `keras_parallel.callbacks.BackupAndRestore` resumes from the
last finished epoch. Parameter-server training is asynchronous: a lost worker
is reported and the others go on; with restarts left it alone starts again.
A `ps` task holds the variables: its exit stops (or restarts) everything.

Standard library only, as the launcher.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from keras_parallel.launch_tasks import Task, describe_exit, exit_code, stop
from keras_parallel.progress import ProgressWatch

# A ps task serves inside `ParameterServer()`, which never returns there; one
# that ended by itself ran a script that never made that strategy.
NO_PARAMETER_SERVER = (
    "a ps task serves the variables from inside keras_parallel.ParameterServer(), "
    "which does not return there, so the script never created one (--ps is for "
    "ParameterServer only). Create the strategy with "
    "`keras_parallel.ParameterServer()`, or launch without --ps."
)
# The launcher's exit code for a stalled job, as `timeout(1)`'s.
STALL_EXIT_CODE = 124
_POLL_INTERVAL = 0.1
# How long stalled workers get to print their stacks before they are stopped.
_STACK_DUMP_WAIT = 1.0


class Supervisor:
    """Waits for the tasks and applies the policy above.

    Args:
        tasks: the cluster's tasks, all started.
        start: starts a task (again), with its restart count and a fresh
            progress file (registered with `watch`).
        watch: the workers' progress.
        received: signals sent to the launcher (appended by its handler).
        grace_period: seconds a stopped task gets before SIGKILL.
        max_restarts: restarts allowed in all (a task or the whole cluster).
        lock: held while the launcher prints, as while a task's line is.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        start: Callable[[Task], None],
        watch: ProgressWatch,
        received: list[int],
        grace_period: float,
        max_restarts: int,
        lock: threading.Lock,
    ):
        self.tasks = list(tasks)
        self.workers = [task for task in tasks if task.job == "worker"]
        self.start = start
        self.watch = watch
        self.received = received
        self.grace_period = grace_period
        self.max_restarts = max_restarts
        self.restarts = 0
        self.lock = lock

    def run(self) -> int:
        """Returns the launcher's exit code once the workers are done: 0 when
        they finished (under parameter servers: those not lost), else the
        first failure's code (128 + N for signal N, `STALL_EXIT_CODE` for a
        stall), or 128 + N when signal N stopped the launcher itself."""
        while True:
            if self.received:
                signum = self.received[0]
                self._stop(self.tasks, signum)
                return 128 + signum
            code = self._check_exits()
            if code is None:
                code = self._check_progress()
            if code is not None:
                return code
            if self._workers_done():
                return self._finish()
            time.sleep(_POLL_INTERVAL)

    def _check_exits(self) -> int | None:
        for task in self.tasks:
            code = task.poll()
            if code is None or task.outcome is not None:
                continue
            task.outcome = code
            what = f"{task.name} {describe_exit(code)}"
            if task.job == "worker" and code == 0:
                continue
            if task.job == "ps" and code == 0:
                # Stopped by us it would have died by a signal.
                self._say(f"{what}: {NO_PARAMETER_SERVER}")
                self._stop(self.tasks, signal.SIGTERM)
                return exit_code(code)
            if task.job == "ps" and self._workers_done():
                continue  # stopped with the workers, or about to be
            if task.job == "worker" and self.watch.independent:
                self._lose(task, what)
                continue
            running = any(other.running for other in self.tasks)
            self._say(what + ("; stopping the other workers." if running else "."))
            return self._stop_all(what, exit_code(code))
        return None

    def _check_progress(self) -> int | None:
        now = time.monotonic()
        running = [worker.index for worker in self.workers if worker.running]
        self.watch.observe(running, now)
        stalled = self.watch.stalled(running, now)
        if not stalled:
            return None
        # The stalled first: the others' state only explains the stall.
        for index in sorted(running, key=lambda i: i not in stalled):
            progress = self.watch.progress(index)
            state = progress.describe() if progress else "has not made its strategy"
            if index in stalled:
                quiet = self.watch.quiet_for(index, now)
                self._say(
                    f"worker {index} is stalled: no progress for {quiet:.0f} s, "
                    f"{state}."
                )
            elif not self.watch.independent:
                self._say(f"worker {index} is waiting, {state}.")
        # Under parameter servers the others are not involved.
        asked = stalled if self.watch.independent else running
        reporting = [
            self.workers[index]
            for index in asked
            if self.watch.progress(index) is not None
        ]
        if reporting:
            self._say(f"the Python stacks of {_names(reporting)} follow (SIGUSR1).")
            for worker in reporting:
                worker.signal(signal.SIGUSR1, group=False)
            time.sleep(_STACK_DUMP_WAIT)
        what = f"{_names(self.workers[i] for i in stalled)} stalled"
        # SIGKILL: stuck workers would not act on SIGTERM (which TensorFlow's
        # coordination service takes for a preemption notice anyway).
        if not self.watch.independent:
            self._say("stopping all workers.")
            return self._stop_all(what, STALL_EXIT_CODE, signal.SIGKILL)
        for index in stalled:
            worker = self.workers[index]
            self._stop([worker], signal.SIGKILL)
            worker.outcome = STALL_EXIT_CODE
            self._lose(worker, f"worker {index} stalled")
        return None

    def _workers_done(self) -> bool:
        return all(worker.outcome is not None for worker in self.workers)

    def _stop_all(
        self, reason: str, code: int, signum: int = signal.SIGTERM
    ) -> int | None:
        """Stops every task with `signum`, then starts them all again if
        restarts are left (None), else returns `code`."""
        self._stop(self.tasks, signum)
        return None if self._restart(self.tasks, reason) else code

    def _lose(self, worker: Task, what: str) -> None:
        """Parameter-server training goes on without `worker`, which starts
        again if restarts are left."""
        self._say(
            f"{what}; the other workers go on (parameter-server training is "
            "asynchronous)."
        )
        self._restart([worker], what)

    def _restart(self, tasks: Sequence[Task], reason: str) -> bool:
        if self.restarts >= self.max_restarts:
            return False
        self.restarts += 1
        if len(tasks) < len(self.tasks):
            which = _names(tasks)
        elif len(self.workers) < len(self.tasks):
            which = "all workers and ps tasks"
        else:
            which = "all workers"
        self._say(
            f"restart {self.restarts} of {self.max_restarts} ({reason}): "
            f"starting {which} again."
        )
        for task in tasks:
            self.start(task)
        return True

    def _finish(self) -> int:
        """Every worker is done: the parameter servers only served them."""
        self._stop(self.tasks, signal.SIGTERM)
        lost = [worker for worker in self.workers if worker.outcome != 0]
        if not lost:
            return 0
        names = _names(lost)
        if len(lost) < len(self.workers):
            self._say(f"the other workers finished; lost: {names}.")
            return 0
        self._say(f"every worker was lost: {names}.")
        return exit_code(lost[0].outcome)

    def _stop(self, tasks: Sequence[Task], signum: int) -> None:
        seen = len(self.received)
        stop(tasks, signum, self.grace_period, lambda: len(self.received) > seen)

    def _say(self, message: str) -> None:
        with self.lock:
            print(f"keras-parallel launch: {message}", file=sys.stderr, flush=True)


def _names(tasks: Iterable[Task]) -> str:
    return ", ".join(task.name for task in tasks)
