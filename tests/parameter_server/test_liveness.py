"""Which workers a meeting waits for, from the rows of the roll as a worker
reads them over time (a clock of our own stands in for time.monotonic)."""

import contextlib
import warnings

import numpy as np
import pytest

from keras_parallel.parameter_server import liveness
from keras_parallel.parameter_server.liveness import BEATS, GONE, UPDATES, Attendance

TIMEOUT = 10.0


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(liveness.time, "monotonic", clock)
    return clock


@contextlib.contextmanager
def warnings_raised():
    """The warnings raised inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def rows(*beats, gone=(), updates=0):
    table = np.zeros([len(beats), 4], np.int64)
    table[:, BEATS] = beats
    table[:, UPDATES] = updates
    for j in gone:
        table[j, GONE] = 1
    return table


def look(attendance, clock, table, after):
    """What `attendance` makes of `table`, read every second for `after` s."""
    absent = attendance.absent(table)
    for _ in range(int(after)):
        clock.now += 1
        absent = attendance.absent(table)
    return absent


def test_a_silent_worker_is_dropped_once_and_waited_for_again_when_back(clock):
    attendance = Attendance(index=0, timeout=TIMEOUT)
    with pytest.warns(UserWarning, match="worker 1 stopped after 7 updates"):
        assert look(attendance, clock, rows(5, 3, updates=7), TIMEOUT + 1) == {1}
    # Reported once, however long it stays silent.
    with warnings_raised() as raised:
        assert look(attendance, clock, rows(6, 3), TIMEOUT) == {1}
    assert raised == []
    with pytest.warns(UserWarning, match="worker 1 is back"):
        assert attendance.absent(rows(7, 4)) == set()


def test_silent_for_less_than_the_timeout_is_waited_for(clock):
    attendance = Attendance(index=0, timeout=TIMEOUT)
    assert look(attendance, clock, rows(5, 3), TIMEOUT - 1) == set()


def test_never_started_is_waited_for_and_gone_is_not(clock):
    attendance = Attendance(index=1, timeout=TIMEOUT)
    with warnings_raised() as raised:
        assert look(attendance, clock, rows(0, 4, 9, gone=[2]), 3 * TIMEOUT) == {2}
    assert raised == []  # leaving is no fault


def test_a_stall_of_the_observer_is_not_taken_for_the_others(clock):
    attendance = Attendance(index=0, timeout=TIMEOUT)
    assert attendance.absent(rows(5, 3)) == set()
    clock.now += 3 * TIMEOUT  # this worker was not scheduled meanwhile
    assert attendance.absent(rows(5, 3)) == set()


def test_bad_timeout_is_refused(monkeypatch):
    monkeypatch.setenv(liveness.WORKER_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="a positive number, e.g. 60. Received: "):
        liveness.worker_timeout()
    monkeypatch.setenv(liveness.WORKER_TIMEOUT_ENV, "2.5")
    assert liveness.worker_timeout() == 2.5
