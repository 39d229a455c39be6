"""Which workers are alive, so that meetings wait for those only.

Every worker has a row on the first ps task (the roll): how many meetings
it reached, its heartbeat, the updates it had applied at its last beat, and
whether it left (its script ended). A thread of each worker beats every
`interval` seconds. A worker waiting in a meeting watches the others' beats
on its own clock (workers' clocks need not agree): one whose beat has not
changed for `KERAS_PARALLEL_PS_WORKER_TIMEOUT` seconds (default 60) has
stopped, is reported once and is not waited for; if it beats again (started
again with the same `TF_CONFIG`), meetings wait for it again. A worker that
never beat has not started yet, and is waited for.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_parallel.parameter_server.lost_ps import reported_as_lost, unreachable
from keras_parallel.parameter_server.variables import shared_variable

WORKER_TIMEOUT_ENV = "KERAS_PARALLEL_PS_WORKER_TIMEOUT"
DEFAULT_WORKER_TIMEOUT_SECONDS = 60.0
# The columns of a worker's row.
ARRIVALS, BEATS, UPDATES, GONE = range(4)


def worker_timeout() -> float:
    """Seconds without a heartbeat after which a worker counts as stopped:
    `KERAS_PARALLEL_PS_WORKER_TIMEOUT`, or 60."""
    text = os.environ.get(WORKER_TIMEOUT_ENV)
    if text is None:
        return DEFAULT_WORKER_TIMEOUT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(
            f"{WORKER_TIMEOUT_ENV} is the number of seconds without a "
            "heartbeat after which a ParameterServer worker counts as stopped: "
            f"a positive number, e.g. 60. Received: {WORKER_TIMEOUT_ENV}={text!r}"
        )
    return value


class Roll:
    """Every worker's row on the first ps task; each writes its own only."""

    def __init__(self, prefix: str, device: str, num_workers: int, index: int):
        self.index = index
        self.variable = shared_variable(
            f"{prefix}/roll",
            device,
            tf.zeros([num_workers, 4], tf.int64),
            initialize=index == 0,
            name="roll",
            trainable=False,
        )

    def read(self) -> np.ndarray:
        """All rows, `[num_workers, 4]`."""
        with reported_as_lost():
            return self.variable.numpy()

    def write(self, values: dict[int, int]) -> None:
        """Sets columns of this worker's row: {column: value}."""
        columns = sorted(values)
        with reported_as_lost(), tf.device(self.variable.device):
            tf.raw_ops.ResourceScatterNdUpdate(
                ref=self.variable.handle,
                indices=tf.constant([[self.index, c] for c in columns]),
                updates=tf.constant([values[c] for c in columns], tf.int64),
            )


class Heartbeat:
    """This worker's beat: once at `start`, then from a thread; at exit it
    marks the worker gone, so that nobody waits for it."""

    def __init__(self, roll: Roll, updates: tf.Variable, interval: float):
        self._roll = roll
        self._updates = updates
        self._interval = interval
        self._stopping = threading.Event()
        self._beats = int(roll.read()[roll.index, BEATS])
        self._thread = threading.Thread(
            target=self._beat_forever, name="keras_parallel heartbeat", daemon=True
        )

    def start(self) -> None:
        self._beat({GONE: 0})
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stops beating and marks this worker gone (unless the ps is)."""
        self._stopping.set()
        if unreachable():
            return  # nobody waits for this worker, and a write could hang
        self._thread.join(self._interval + 5)
        if not self._thread.is_alive():
            try:
                self._roll.write({GONE: 1})
            except Exception:  # noqa: BLE001 - the ps is gone: nobody waits
                pass

    def _beat(self, extra: dict[int, int]) -> None:
        self._beats += 1
        updates = int(self._updates.numpy())
        self._roll.write({BEATS: self._beats, UPDATES: updates, **extra})

    def _beat_forever(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._beat({})
            except Exception:  # noqa: BLE001 - a ps gone is lost_ps's to report
                if unreachable():
                    return
                # Otherwise a passing failure: beat again at the next turn.


class Attendance:
    """What this worker saw of the others' beats, on its own clock."""

    def __init__(self, index: int, timeout: float):
        self.index = index
        self.timeout = timeout
        self._seen: dict[int, tuple[int, float]] = {}  # beat, when first seen
        self._stopped: set[int] = set()
        self._last_look = None

    def absent(self, rows: np.ndarray) -> set[int]:
        """The other workers not to wait for: gone, or stopped."""
        now = time.monotonic()
        if self._last_look is not None and now - self._last_look > self.timeout / 2:
            # This worker itself was held up (a busy machine): what it saw
            # before says nothing about the others' beats since.
            self._seen = {j: (beat, now) for j, (beat, _) in self._seen.items()}
        self._last_look = now
        absent = set()
        for j, row in enumerate(rows):
            if j == self.index or row[BEATS] == 0:
                continue  # never beat: not started yet, waited for
            beat, since = self._seen.get(j, (None, now))
            if beat != row[BEATS]:
                self._seen[j] = (int(row[BEATS]), now)
                if j in self._stopped:
                    self._stopped.discard(j)
                    warnings.warn(
                        f"keras_parallel.ParameterServer: worker {j} is back "
                        "(started again); meetings wait for it again.",
                        stacklevel=4,
                    )
            elif now - since > self.timeout and not row[GONE]:
                if j not in self._stopped:
                    self._stopped.add(j)
                    warnings.warn(
                        f"keras_parallel.ParameterServer: worker {j} stopped "
                        f"after {row[UPDATES]} updates (no heartbeat for "
                        f"{now - since:.1f} s); continuing without it. "
                        "Started again with the same TF_CONFIG, it rejoins.",
                        stacklevel=4,
                    )
            if row[GONE] or j in self._stopped:
                absent.add(j)
        return absent
