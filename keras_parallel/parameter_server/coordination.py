"""What workers share besides the model: meetings and the update count.

Both are variables on the first ps task, so workers coordinate without ever
talking to each other (a worker's client connects to the ps tasks only).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from keras_parallel.parameter_server.variables import POLL_SECONDS, shared_variable

MEETING_TIMEOUT_SECONDS = 600
# ResourceCountUpTo stops at a limit; ours is never reached.
_NO_LIMIT = 2**62


class Meetings:
    """Workers meeting: each counts its arrivals in its own slot, and waits
    until every slot reaches its own count."""

    def __init__(self, prefix: str, device: str, num_workers: int, index: int):
        self.index = index
        self.count = 0
        self.arrivals = shared_variable(
            f"{prefix}/meetings",
            device,
            tf.zeros([num_workers], tf.int64),
            initialize=index == 0,
            name="meetings",
            trainable=False,
        )

    def meet(self, what: str, timeout: float = MEETING_TIMEOUT_SECONDS) -> None:
        """Returns once every worker has arrived here as often as this one."""
        self.count += 1
        with tf.device(self.arrivals.device):
            tf.raw_ops.ResourceScatterAdd(
                resource=self.arrivals.handle,
                indices=tf.constant([self.index]),
                updates=tf.constant([1], tf.int64),
            )
        deadline = time.monotonic() + timeout
        while True:
            arrived = self.arrivals.numpy()
            if np.all(arrived >= self.count):
                return
            if time.monotonic() > deadline:
                missing = [i for i, n in enumerate(arrived) if n < self.count]
                raise TimeoutError(
                    f"Worker(s) {missing} did not reach {what} (meeting "
                    f"{self.count}) within {timeout:.0f} s."
                )
            time.sleep(POLL_SECONDS)


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
