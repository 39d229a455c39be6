"""A ps task that stops is reported as `ParameterServerLostError`, naming
the task and its address, within seconds on every worker.

The variables live on the ps tasks, so a worker cannot go on without one.
What TensorFlow says varies with the moment the ps died (`Socket closed`,
`Connection reset by peer`, `Remote address ... found to be poisoned`), and
after the first error a worker's next remote operation can wait for ever
(gRPC waits for the channel to be ready again). So a worker does not rely on
TensorFlow's errors to learn that a ps is gone: a thread connects to each ps
task's port every second (a plain TCP connection, no TensorFlow operation
that could hang). Then:

- an error that ends the script while a ps is unreachable is reported as
  `ParameterServerLostError` (an explainer of `keras_parallel.error_reports`);
- the waits of ours (meetings, variables not yet initialised) raise it;
- a worker whose script has not ended `REPORT_SECONDS` after the ps was found
  gone (blocked in a TensorFlow operation that will never return) prints the
  report and exits with status 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import sys
import threading
import time

import tensorflow as tf

from keras_parallel.error_reports import add_explainer, chain

CHECK_SECONDS = 1.0
# Unreachable this long (at least two failed connections) means gone.
LOST_AFTER_SECONDS = 3.0
# A ps task that never answered yet is starting (workers often start first),
# not lost: it is given this long before the worker gives up on it.
START_SECONDS = 600.0
# Given to the script to end by its own error, before the worker exits.
REPORT_SECONDS = 20.0
# The line of TensorFlow's message that says why (its first line often says
# only "Graph execution error:").
_CAUSE = re.compile(r"socket|connect|unavailable|poisoned|reset", re.IGNORECASE)


class ParameterServerLostError(RuntimeError):
    """A ps task of the cluster stopped answering, so training cannot go on."""


class _Watch:
    """The ps tasks this process depends on, and what was found of them."""

    def __init__(self) -> None:
        self.tasks: list[tuple[int, str]] = []
        self.lost: str | None = None
        self.ending = False


_watch = _Watch()


def watch_ps_tasks(addresses: list[str]) -> None:
    """Starts watching the ps tasks at `addresses` (task i at
    `addresses[i]`), once per process.

    Args:
        addresses: `host:port` of every ps task.
    """
    first = not _watch.tasks
    _watch.tasks = list(enumerate(addresses))
    if not first:
        return
    add_explainer(_explain)
    atexit.register(_at_exit)
    threading.Thread(
        target=_check_forever, name="keras_parallel ps watch", daemon=True
    ).start()


def raise_if_lost() -> None:
    """Raises `ParameterServerLostError` once a ps task was found gone."""
    if _watch.lost is not None:
        raise ParameterServerLostError(_watch.lost) from None


@contextlib.contextmanager
def reported_as_lost():
    """Inside the block, a TensorFlow error while a ps task is unreachable
    becomes `ParameterServerLostError`."""
    raise_if_lost()
    try:
        yield
    except tf.errors.OpError as error:
        report = _explain(error)
        if report is None:
            raise
        raise report from None


def unreachable(timeout: float = CHECK_SECONDS) -> list[tuple[int, str, str]]:
    """The ps tasks that accept no connection now: (index, address, why)."""
    found = []
    for index, address in _watch.tasks:
        host, port = address.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout).close()
        except OSError as error:
            found.append((index, address, str(error) or type(error).__name__))
    return found


def describe(gone: list[tuple[int, str, str]], reported: str | None) -> str:
    """The report of ps tasks `gone`; `reported`: what TensorFlow said."""
    said = f" TensorFlow reports: {reported!r}." if reported else ""
    return (
        f"Parameter server {_names(gone)} stopped answering.{said} The variables "
        "lived there, so training cannot go on: restart the whole job (every "
        "ps task and worker; `keras-parallel launch --ps K` starts them "
        "together); with keras_parallel.callbacks.BackupAndRestore training "
        "resumes from the last finished epoch."
    )


def _names(tasks: list[tuple[int, str, str]]) -> str:
    return ", ".join(f"ps {i} ({address}: {why})" for i, address, why in tasks)


def _never_answered(tasks: list[tuple[int, str, str]], waited: float) -> str:
    return (
        f"Parameter server {_names(tasks)} never answered in {waited:.0f} s. Start "
        "every ps task of the cluster (the same TF_CONFIG cluster, with task "
        "type 'ps'), or use `keras-parallel launch --ps K`, which starts them."
    )


def _explain(error: BaseException) -> ParameterServerLostError | None:
    if isinstance(error, ParameterServerLostError):
        return None  # already ours
    failures = [e for e in chain(error) if isinstance(e, tf.errors.OpError)]
    if not failures or not _watch.tasks:
        return None
    lines = [line.strip() for line in failures[0].message.splitlines()]
    gone = unreachable()
    if not gone and any(map(_CAUSE.search, lines)):
        # A ps killed closes its connections before its listening port: a
        # worker can fail on the first while the second still accepts.
        deadline = time.monotonic() + LOST_AFTER_SECONDS
        while not gone and time.monotonic() < deadline:
            time.sleep(CHECK_SECONDS / 5)
            gone = unreachable()
    if not gone:
        return None
    said = next(filter(_CAUSE.search, lines), next(filter(None, lines), None))
    return ParameterServerLostError(describe(gone, said))


class Verdict:
    """What the connection checks say of the ps tasks over time.

    A task that answered once and then accepts no connection for
    `LOST_AFTER_SECONDS` is lost; one that never answered is starting (workers
    often start first) until `START_SECONDS` after the watch began.
    """

    def __init__(self, now: float) -> None:
        self.started = now
        self.answered: set[int] = set()
        self.failing_since: float | None = None

    def observe(
        self, tasks: list[tuple[int, str]], down: list[tuple[int, str, str]], now: float
    ) -> str | None:
        """The report once a task counts as lost (None while none does).

        Args:
            tasks: every watched task, (index, address).
            down: the tasks that accepted no connection now, as `unreachable`.
            now: the time of the check.
        """
        down_ids = {i for i, _, _ in down}
        self.answered.update(i for i, _ in tasks if i not in down_ids)
        gone = [task for task in down if task[0] in self.answered]
        starting = [task for task in down if task[0] not in self.answered]
        if not gone:
            self.failing_since = None
        elif self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= LOST_AFTER_SECONDS:
            return describe(gone, None)
        if starting and now - self.started >= START_SECONDS:
            return _never_answered(starting, now - self.started)
        return None


def _check_forever() -> None:
    verdict = Verdict(time.monotonic())
    while _watch.lost is None:
        _watch.lost = verdict.observe(_watch.tasks, unreachable(), time.monotonic())
        time.sleep(CHECK_SECONDS)
    lost_at = time.monotonic()
    while time.monotonic() - lost_at < REPORT_SECONDS:
        if _watch.ending:
            return
        time.sleep(CHECK_SECONDS / 4)
    _exit_with_report()


def _at_exit() -> None:
    # With a ps gone, TensorFlow's own teardown can wait on it for long. A
    # script that failed (Python sets `sys.last_value` when it reports an
    # uncaught error) has said all there is to say, so it ends here.
    _watch.ending = True
    failed = _watch.lost is not None or hasattr(sys, "last_value")
    if failed and unreachable():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _exit_with_report() -> None:
    name = f"{ParameterServerLostError.__module__}.{ParameterServerLostError.__name__}"
    print(f"{name}: {_watch.lost}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
