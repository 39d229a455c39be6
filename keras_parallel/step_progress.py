"""A worker's step counts, and the thread that watches them.

Two int64 variables on the worker's CPU count the steps begun and finished:
the strategy adds one to each in its traced step (`counting`), so nothing of
Python runs per step and none of the user's objects or callbacks is touched.
A daemon thread reads them a few times a second and hands the counts to its
listeners: the progress file of `keras-parallel launch` (`progress.py`), and
on a cluster the strategy's own watch on its collectives
(`data_parallel/collective_watch.py`). For the launcher, the thread's start
also registers `faulthandler` for SIGUSR1, with which the launcher has a
stalled worker print its Python stacks to its stderr.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import tensorflow as tf

from keras_parallel.progress import PROGRESS_FILE, Progress, write_progress

_INTERVAL_SECONDS = 0.25
# Called with this process's counts and `time.monotonic()` at every look.
Listener = Callable[[Progress, float], None]


class StepCounter:
    """Steps begun and finished by one strategy of this process."""

    def __init__(self, device: str):
        with tf.init_scope(), tf.device(device):
            self.started = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.completed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._waiting = False

    def read(self) -> Progress:
        return Progress(
            int(self.started.numpy()), int(self.completed.numpy()), self._waiting
        )

    @contextlib.contextmanager
    def waiting(self):
        """Inside the block this worker waits for the others (not a step)."""
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def counting(self, run):
        """Runs `run()` (which traces or runs one step) and returns its
        outputs, counted as a step begun and, once every stateful op of the
        step (its collectives and updates) has run, finished."""
        if tf.executing_eagerly():
            self.started.assign_add(1)
            outputs = run()
            self.completed.assign_add(1)
            return outputs
        graph = tf.compat.v1.get_default_graph()
        first = len(graph.get_operations())
        self.started.assign_add(1)
        outputs = run()
        after = [op for op in graph.get_operations()[first:] if op.op_def.is_stateful]
        results = [
            t
            for t in tf.nest.flatten(outputs, expand_composites=True)
            if isinstance(t, tf.Tensor)
        ]
        with tf.control_dependencies(after + results):
            self.completed.assign_add(1)
        return outputs


def step_counter(device: str, **listeners: Listener) -> StepCounter | None:
    """A counter of this strategy's steps, watched by `listeners` (by name: a
    strategy made again replaces its predecessor's) and, in a process started
    by `keras-parallel launch`, reported to the launcher; None when nobody
    would watch it.

    Args:
        device: this worker's CPU, where the counts live.
        **listeners: called from the watching thread with the counts.
    """
    path = os.environ.get(PROGRESS_FILE)
    if not path and not listeners:
        return None
    counter = StepCounter(device)
    monitor = _monitor()
    if path and "launcher" not in monitor.listeners:
        # Registered before the first report: a worker the launcher watches
        # can always be asked for its stacks.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        monitor.listeners["launcher"] = _FileReport(path)
    monitor.listeners.update(listeners)
    monitor.follow(counter)
    return counter


class _FileReport:
    """Keeps the launcher's progress file at the latest counts."""

    def __init__(self, path: str):
        self._path = path
        self._written: Progress | None = None

    def __call__(self, progress: Progress, now: float) -> None:
        if progress != self._written:
            write_progress(self._path, progress)
            self._written = progress


class _Monitor(threading.Thread):
    """Reads this process's step counts (all its strategies', added up) and
    hands them to the listeners."""

    def __init__(self):
        super().__init__(name="keras_parallel step progress", daemon=True)
        self.listeners: dict[str, Listener] = {}
        self._lock = threading.Lock()
        self._counter: StepCounter | None = None
        self._before = Progress()

    def follow(self, counter: StepCounter) -> None:
        """Counts `counter` from now on (a strategy made again in a notebook
        goes on from the steps of the previous one)."""
        with self._lock:
            if self._counter is not None:
                last = self._counter.read()
                self._before = Progress(
                    self._before.started + last.started,
                    self._before.completed + last.completed,
                )
            self._counter = counter
        self._look()

    def _look(self) -> None:
        with self._lock:
            if self._counter is None:
                return
            now = self._counter.read()
            total = Progress(
                self._before.started + now.started,
                self._before.completed + now.completed,
                now.waiting,
            )
            listeners = list(self.listeners.values())
        for listener in listeners:
            # One listener's failure (a store unreachable at exit, say)
            # must not silence the others.
            with contextlib.suppress(Exception):
                listener(total, time.monotonic())

    def run(self) -> None:
        while True:
            time.sleep(_INTERVAL_SECONDS)
            with contextlib.suppress(Exception):  # never stop watching
                self._look()


_MONITOR: list[_Monitor] = []


def _monitor() -> _Monitor:
    if not _MONITOR:
        _MONITOR.append(_Monitor())
        _MONITOR[0].start()
    return _MONITOR[0]
