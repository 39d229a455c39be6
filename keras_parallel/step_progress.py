"""A launched worker's side of the progress channel (`progress.py`).

Two int64 variables on the worker's CPU count the steps begun and finished:
the strategy adds one to each in its traced step (`counting`), so nothing of
Python runs per step and none of the user's objects or callbacks is touched.
A daemon thread reads them a few times a second and rewrites the file the
launcher watches when they change. The same thread's start registers
`faulthandler` for SIGUSR1, with which the launcher has a stalled worker print
its Python stacks to its stderr before it stops it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

import tensorflow as tf

from keras_parallel.progress import PROGRESS_FILE, Progress, write_progress

_INTERVAL_SECONDS = 0.25


class StepCounter:
    """Steps begun and finished by one strategy of this process."""

    def __init__(self, device: str):
        with tf.init_scope(), tf.device(device):
            self.started = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.completed = tf.Variable(0, dtype=tf.int64, trainable=False)

    def read(self) -> Progress:
        return Progress(int(self.started.numpy()), int(self.completed.numpy()))

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


def step_counter(device: str) -> StepCounter | None:
    """A counter whose steps are reported to the launcher, or None when this
    process was not started by `keras-parallel launch`.

    Args:
        device: this worker's CPU, where the counts live.
    """
    path = os.environ.get(PROGRESS_FILE)
    if not path:
        return None
    counter = StepCounter(device)
    _reporter(path).follow(counter)
    return counter


class _Reporter(threading.Thread):
    """Writes this process's step counts (all its strategies', added up)."""

    def __init__(self, path: str):
        super().__init__(name="keras_parallel progress", daemon=True)
        self._path = path
        self._lock = threading.Lock()
        self._counter: StepCounter | None = None
        self._before = Progress()
        self._written: Progress | None = None

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
        self._report()

    def _report(self) -> None:
        with self._lock:
            if self._counter is None:
                return
            now = self._counter.read()
            total = Progress(
                self._before.started + now.started,
                self._before.completed + now.completed,
            )
            if total != self._written:
                write_progress(self._path, total)
                self._written = total

    def run(self) -> None:
        while True:
            time.sleep(_INTERVAL_SECONDS)
            with contextlib.suppress(Exception):  # never stop reporting
                self._report()


_REPORTERS: dict[str, _Reporter] = {}


def _reporter(path: str) -> _Reporter:
    if path not in _REPORTERS:
        # Registered before the first report: a worker the launcher watches
        # can always be asked for its stacks.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        _REPORTERS[path] = _Reporter(path)
        _REPORTERS[path].start()
    return _REPORTERS[path]
