"""What a collective that timed out means, in words.

Across workers every collective of a DataParallel step waits at most
`DataParallel(collective_timeout=...)` seconds for the other workers
(`multi_worker.py` passes it to TensorFlow's collectives through
`CommunicationOptions(timeout_seconds=...)`). Then TensorFlow raises a
`DeadlineExceededError` saying only "Collective has timed out during
execution" and the node: it does not say which worker did not arrive. The
worker that timed out is a victim: the culprit is stalled outside its step.
"""

from __future__ import annotations

import re

import tensorflow as tf

# TensorFlow's words (collective_ops.cc) for a collective past its timeout.
TIMED_OUT = "Collective has timed out"


def explain_timeout(error: BaseException) -> str | None:
    """The explanation of `error` if it is a collective that timed out, else
    None.

    Args:
        error: an error raised by a step (from `fit`, `evaluate`, ...).

    Returns:
        A message saying what timed out, what usually causes it and what to
        do, or None for any other error.

    Example:

    ```python
    try:
        model.fit(x, y)
    except tf.errors.DeadlineExceededError as error:
        raise RuntimeError(explain_timeout(error) or str(error)) from error
    ```
    """
    if not isinstance(error, tf.errors.DeadlineExceededError):
        return None
    if TIMED_OUT not in (error.message or ""):
        return None
    node = re.search(r"\{\{node ([^}]+)\}\}", error.message)
    where = f" ({node[1]})" if node else ""
    return (
        f"A collective of this worker's step{where} waited longer than "
        "DataParallel's collective_timeout for the other workers, and at "
        "least one of them never came: it is stalled outside its step (in a "
        "data loader, a callback, a file system call) or far slower. "
        "TensorFlow does not say which worker; `keras-parallel launch "
        "--timeout S` names it and its last completed step, and its stderr "
        "shows where it is. If a worker is legitimately that slow (a first "
        "step's tracing, an evaluation only one worker runs), give "
        "DataParallel(collective_timeout=...) more seconds, or None to wait "
        "for ever."
    )
