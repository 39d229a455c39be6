"""A worker lost during multi-worker training is reported as
`WorkerFailedError`, naming it and what to do, instead of a collective's
error from deep inside TensorFlow.

Keras runs a step through its compiled function, and the error of a
collective whose peer is gone is raised from there, out of `fit`; nothing
of the strategy's runs in between, and the user's model is not ours to
wrap. What Python does with an uncaught error is its `sys.excepthook`'s to
say: the strategy adds an explainer to the package's hook
(`keras_parallel.error_reports`) that reports those errors, and only those,
as `WorkerFailedError`.
"""

from __future__ import annotations

import re

import tensorflow as tf

from keras_parallel.error_reports import add_explainer

# What a collective step raises when a peer is gone: the coordination
# service's heartbeat check aborts every collective of the survivors.
PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
)


class WorkerFailedError(RuntimeError):
    """Another worker of the cluster stopped, so training cannot go on."""


def report_lost_workers() -> None:
    """Makes Python report an uncaught error of a lost peer as a
    `WorkerFailedError`."""
    add_explainer(_explain)


def _explain(error: BaseException) -> WorkerFailedError | None:
    if isinstance(error, PEER_ERRORS):
        return WorkerFailedError(describe(error))
    return None


def describe(error: tf.errors.OpError) -> str:
    """The report of `error`, a collective's error of a lost peer."""
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message)))
    lines = [line.strip() for line in error.message.splitlines()]
    reason = next(
        (line for line in lines if "unhealthy" in line or "aborted" in line.lower()),
        lines[0] if lines else type(error).__name__,
    )
    return (
        f"A worker of the cluster is gone ({', '.join(tasks) or 'unknown task'}); "
        f"TensorFlow reports: {reason!r}. Training cannot continue without it: "
        "restart all workers (`keras-parallel launch` stops and starts them "
        "together); with keras_parallel.callbacks.BackupAndRestore they resume "
        "from the last finished epoch."
    )
