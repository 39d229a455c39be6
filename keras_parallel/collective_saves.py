"""Saves that every worker of a cluster runs at the same moment.

Such a save may read state that is each worker's own through a collective and
write its sum over all workers: PowerSGD's error memory differs from worker
to worker, and only its sum enters the next steps. A save run by one worker
alone must not start a collective that the others never join, so only code
that runs the same save on every worker (the callbacks of
`keras_parallel.callbacks`) marks its saves so.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_marked = threading.local()


@contextlib.contextmanager
def every_worker_saves() -> Iterator[None]:
    """Saves made inside the block are made by every worker at once."""
    outer = every_worker_is_saving()
    _marked.value = True
    try:
        yield
    finally:
        _marked.value = outer


def every_worker_is_saving() -> bool:
    """Whether a save made now is made by every worker at once."""
    return getattr(_marked, "value", False)
