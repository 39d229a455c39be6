"""What workers share besides the model: meetings and the update count.

Both are variables on the first ps task, so workers coordinate without ever
talking to each other (a worker's client connects to the ps tasks only).
"""

from __future__ import annotations

import math
import os
import time

import tensorflow as tf

from keras_parallel.parameter_server.liveness import (
    ARRIVALS,
    BEATS,
    GONE,
    UPDATES,
    Attendance,
    Heartbeat,
    Roll,
    worker_timeout,
)
from keras_parallel.parameter_server.variables import POLL_SECONDS, shared_variable
from keras_parallel.progress import STALL_TIMEOUT

MEETING_TIMEOUT_SECONDS = 600
# Under the launcher a meeting waits this much longer than its stall timeout,
# so that the launcher, which sees every worker, reports a stall first.
LAUNCHER_FIRST_SECONDS = 60
# ResourceCountUpTo stops at a limit; ours is never reached.
_NO_LIMIT = 2**62


class Meetings:
    """Workers meeting: each writes in its row of the roll how many meetings
    it reached, and waits until every other worker's count reaches its own,
    except workers gone or stopped (`liveness.Attendance`).

    A worker started again counts its meetings on from the others' count,
    so that it meets them at their next meeting rather than at their first.
    """

    def __init__(
        self,
        prefix: str,
        device: str,
        num_workers: int,
        index: int,
        updates: tf.Variable,
    ):
        self.index = index
        self.roll = Roll(prefix, device, num_workers, index)
        timeout = worker_timeout()
        self.attendance = Attendance(index, timeout)
        rows = self.roll.read()
        self.count = int(rows[index, ARRIVALS])
        if rows[index, BEATS] > 0:  # this worker ran before: started again
            others = [
                int(row[ARRIVALS])
                for j, row in enumerate(rows)
                if j != index and row[BEATS] > 0 and not row[GONE]
            ]
            self.count = max(others, default=self.count)
            self.roll.write({ARRIVALS: self.count})
        self.heartbeat = Heartbeat(self.roll, updates, min(1.0, timeout / 5))
        self.heartbeat.start()

    def meet(self, what: str, timeout: float | None = None) -> None:
        """Returns once every other worker still running has arrived here as
        often as this one; a worker alive but absent for `timeout` seconds
        (None: `keras-parallel launch --timeout`, else
        `MEETING_TIMEOUT_SECONDS`) is a stall, and raises."""
        timeout = meeting_timeout() if timeout is None else timeout
        self.count += 1
        self.roll.write({ARRIVALS: self.count})
        deadline = time.monotonic() + timeout
        while True:
            rows = self.roll.read()
            absent = self.attendance.absent(rows)
            missing = [
                j
                for j, row in enumerate(rows)
                if row[ARRIVALS] < self.count and j not in absent
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                done = ", ".join(
                    f"worker {j} after {rows[j][UPDATES]} updates" for j in missing
                )
                raise TimeoutError(
                    f"Stalled: {done} did not reach {what} (meeting "
                    f"{self.count}) within {timeout:.0f} s, and still beat "
                    "(or never started): alive but making no progress, e.g. "
                    "blocked in a callback or its input pipeline."
                )
            time.sleep(POLL_SECONDS)


def meeting_timeout() -> float:
    """How long a meeting waits for a live worker: `MEETING_TIMEOUT_SECONDS`;
    under `keras-parallel launch --timeout S`, which judges stalls itself
    (and names the stalled worker), S plus a minute, or for ever with
    `--timeout 0`."""
    given = os.environ.get(STALL_TIMEOUT)
    if given is None:
        return MEETING_TIMEOUT_SECONDS
    seconds = float(given)
    return seconds + LAUNCHER_FIRST_SECONDS if seconds > 0 else math.inf


class UpdateCounter:
    """Counts the updates applied by all workers, for staleness: an update's
    staleness is the number of other updates applied between the moment its
    worker began reading the variables and the moment its own update was
    applied (0 when workers take turns, as one device does)."""

    def __init__(self, prefix: str, device: str, index: int, local_device: str):
        self.total = shared_variable(
            f"{prefix}/updates",
            device,
            tf.constant(0, tf.int64),
            initialize=index == 0,
            name="updates",
            trainable=False,
        )
        with tf.device(local_device):
            # This worker's own sums; never shared.
            self.steps = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.stale_sum = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.stale_max = tf.Variable(tf.constant(0, tf.int64), trainable=False)

    def read(self) -> tf.Tensor:
        """The count now: taken before a step reads any variable."""
        return self.total.read_value()

    def applied(self, start: tf.Tensor, after: list) -> tf.Operation:
        """Counts one update that ran `after` those ops; records its staleness."""
        with tf.control_dependencies(after), tf.device(self.total.device):
            before = tf.raw_ops.ResourceCountUpTo(
                resource=self.total.handle, limit=_NO_LIMIT, T=tf.int64
            )
        staleness = before - start
        with tf.device(self.steps.device):
            return tf.group(
                self.steps.assign_add(1),
                self.stale_sum.assign_add(staleness),
                self.stale_max.assign(tf.maximum(self.stale_max, staleness)),
            )

    def stats(self) -> dict:
        steps = int(self.steps.numpy())
        return {
            "updates": steps,
            "mean_staleness": float(self.stale_sum.numpy()) / max(steps, 1),
            "max_staleness": int(self.stale_max.numpy()),
            "total_updates": int(self.total.numpy()),
        }
