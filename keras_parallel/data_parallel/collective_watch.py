"""A step across workers that waits too long for a stalled worker ends with
an error naming that worker and its last completed step.

A worker stuck outside its step (a data loader, a callback, a file system
call) leaves the others waiting in the step's collectives for ever: their
heartbeats go on, so TensorFlow's health checks see nothing wrong.
TensorFlow's own collective timeout
(`CommunicationOptions(timeout_seconds=...)`) parks a thread per collective
for the whole timeout (its documentation keeps it for debugging) and does not
say who did not come. Instead, each worker's step counts
(`step_progress.py`) go to the coordination service's key-value store when
they change (at most once a second); a worker that has waited inside one step
for `collective_timeout` seconds reads everyone's, names the workers behind
it, and aborts its collectives with that message, as
`MultiWorkerMirroredStrategy`'s health check does for a lost peer. The
package's `sys.excepthook` reports the step's error as a `StalledWorkerError`
with that message.
"""

from __future__ import annotations

import contextlib
import math
import re

import tensorflow as tf

from keras_parallel._tf_internal import (
    abort_collectives,
    get_shared_value,
    put_shared_value,
)
from keras_parallel.error_reports import add_explainer
from keras_parallel.progress import Progress

_KEY = "keras_parallel/step_progress"
# How the abort message starts, and TensorFlow's words around it.
_MARKER = "keras_parallel: worker "
_MESSAGE = re.compile(re.escape(_MARKER) + r"\d+ waited [^\n]*?for ever\.")
_PUBLISH_INTERVAL_SECONDS = 1.0
_READ_TIMEOUT_SECONDS = 1.0


class StalledWorkerError(RuntimeError):
    """A step waited longer than `collective_timeout` for other workers."""


def report_stalled_workers() -> None:
    """Makes Python report the step that a `CollectiveWatch` ended as a
    `StalledWorkerError` with the watch's message (asked before the lost
    workers' explainer, which takes every timed-out collective for a lost
    peer)."""
    add_explainer(_explain)


def _explain(error: BaseException) -> StalledWorkerError | None:
    if isinstance(error, tf.errors.DeadlineExceededError):
        found = _MESSAGE.search(error.message or "")
        if found:
            return StalledWorkerError(found[0].removeprefix("keras_parallel: "))
    return None


class CollectiveWatch:
    """A `step_progress` listener for one worker of a cluster.

    Args:
        timeout: seconds inside one step without progress before the step
            fails; None never.
        worker: this worker's index.
        workers: the number of workers.
        task: this worker's TensorFlow task, `/job:worker/replica:0/task:1`.
    """

    def __init__(self, timeout: float | None, worker: int, workers: int, task: str):
        self.timeout = timeout
        self.worker = worker
        self.workers = workers
        self.task = task
        self._last: Progress | None = None
        self._since = 0.0
        self._published: Progress | None = None
        self._published_at = -math.inf
        self._fired = False

    def __call__(self, progress: Progress, now: float) -> None:
        if progress != self._last:
            self._last, self._since = progress, now
        if (
            progress != self._published
            and now - self._published_at >= _PUBLISH_INTERVAL_SECONDS
        ):
            self._published, self._published_at = progress, now
            # Without a store the others cannot name this worker, but this
            # worker's own timeout still holds.
            with contextlib.suppress(tf.errors.OpError):
                put_shared_value(
                    f"{_KEY}/{self.worker}",
                    f"{progress.started} {progress.completed} {self.task}",
                )
        if (
            self.timeout is None
            or self._fired
            or not progress.in_step
            or now - self._since < self.timeout
        ):
            return
        self._fired = True
        abort_collectives(self.describe(progress, self._others()))

    def _others(self) -> dict[int, tuple[Progress, str] | None]:
        found = {}
        for index in range(self.workers):
            if index == self.worker:
                continue
            text = get_shared_value(f"{_KEY}/{index}", _READ_TIMEOUT_SECONDS)
            if text is None:
                found[index] = None
                continue
            started, completed, task = text.split(" ", 2)
            found[index] = (Progress(int(started), int(completed)), task)
        return found

    def describe(
        self, own: Progress, others: dict[int, tuple[Progress, str] | None]
    ) -> str:
        """The error of this worker's step: whom it waited for."""
        states = {i: state[0] if state else Progress() for i, state in others.items()}
        last = min([own.behind, *(p.behind for p in states.values())])
        behind = [i for i, p in states.items() if p.behind == last]
        head = (
            f"{_MARKER}{self.worker} waited "
            f"{self.timeout:g} s inside step {own.started} for the other "
            f"workers (DataParallel's collective_timeout). "
        )
        if own.behind == last:
            return head + (
                "No worker is behind it: every worker is inside the same step, "
                "so a collective hangs (the network between them?). " + _WHAT_TO_DO
            )
        names = "; ".join(
            f"worker {i} ({others[i][1]}), {states[i].describe()}"
            if others[i]
            else f"worker {i}, which reported no step"
            for i in behind
        )
        return head + (
            f"Behind it: {names}. That worker is stalled outside its step "
            "(in a data loader, a callback, a file system call) or far slower "
            "(`keras-parallel launch --timeout` also prints its Python stack). "
            + _WHAT_TO_DO
        )


_WHAT_TO_DO = (
    "If that is legitimate (a first step's tracing, an evaluation only one "
    "worker runs), give DataParallel(collective_timeout=...) more seconds, or "
    "None to wait for ever."
)
