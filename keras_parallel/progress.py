"""How far each launched worker got, and which of them is stalled.

`keras-parallel launch` gives every worker a file, named by the environment
variable `KERAS_PARALLEL_PROGRESS_FILE`. A strategy in the worker
(`step_progress.py`) keeps it at `"<started> <completed>"`: how many steps
(`strategy.run`, so every `fit`, `evaluate` and `predict` step) the worker has
begun and finished. The launcher reads the files and judges (`ProgressWatch`).

In synchronous training a worker that stops making progress stops everyone:
the worker that sleeps in a callback is *between* steps, while the others
wait *inside* their next step, in its collective. So the job is stalled when
somebody waits inside a step and no worker's counts changed for the timeout,
and the one to blame is the worker furthest behind — fewest steps begun, and
between steps rather than inside one.

Standard library only, as the launcher.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

PROGRESS_FILE = "KERAS_PARALLEL_PROGRESS_FILE"
# The number of times the launcher started this task before (0 at first), as
# torchrun's TORCHELASTIC_RESTART_COUNT.
RESTART_COUNT = "KERAS_PARALLEL_RESTART_COUNT"
# The launcher's `--timeout`, for waits a worker judges itself: a
# ParameterServer meeting names a live worker absent this long as stalled.
STALL_TIMEOUT = "KERAS_PARALLEL_STALL_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class Progress:
    """Steps a worker has begun and finished."""

    started: int = 0
    completed: int = 0
    # Waiting for the other workers outside a step (a ParameterServer
    # meeting): not stalled itself.
    waiting: bool = False

    @property
    def in_step(self) -> bool:
        return self.started > self.completed

    def describe(self) -> str:
        done = (
            f"last completed step {self.completed}"
            if self.completed
            else "no step completed yet"
        )
        if self.waiting:
            return f"waiting for the other workers ({done})"
        if self.in_step:
            return f"inside step {self.started} ({done})"
        return f"not inside a step ({done})"

    @property
    def behind(self) -> tuple[int, bool]:
        """Sorts first for the worker furthest behind."""
        return (self.started, self.in_step)


def write_progress(path: str, progress: Progress) -> None:
    """Replaces the file at `path` whole (the launcher never reads half)."""
    partial = f"{path}.partial"
    with open(partial, "w") as file:
        file.write(f"{progress.started} {progress.completed} {int(progress.waiting)}\n")
    os.replace(partial, path)


def read_progress(path: str) -> Progress | None:
    """The progress in `path`, or None before the worker's strategy exists."""
    try:
        with open(path) as file:
            started, completed, waiting = map(int, file.read().split())
    except (FileNotFoundError, ValueError):
        return None
    return Progress(started, completed, bool(waiting))


class ProgressWatch:
    """The launcher's view of its workers' progress files.

    Args:
        timeout: seconds without progress after which a waiting worker's job
            is stalled; 0 never.
        independent: whether workers progress on their own (parameter-server
            training): then each worker is judged alone, among the workers
            that made no progress for the timeout.
    """

    def __init__(self, timeout: float, independent: bool):
        self.timeout = timeout
        self.independent = independent
        self._paths: dict[int, str] = {}
        self._seen: dict[int, tuple[Progress | None, float]] = {}

    def started(self, index: int, path: str) -> None:
        """Worker `index` (re)starts, reporting into `path`."""
        for stale in (path, f"{path}.partial"):
            if os.path.exists(stale):
                os.remove(stale)
        self._paths[index] = path
        self._seen[index] = (None, time.monotonic())

    def progress(self, index: int) -> Progress | None:
        return self._seen[index][0]

    def quiet_for(self, index: int, now: float) -> float:
        return now - self._seen[index][1]

    def observe(self, running: Iterable[int], now: float) -> None:
        for index in running:
            current = read_progress(self._paths[index])
            if current != self._seen[index][0]:
                self._seen[index] = (current, now)

    def stalled(self, running: Iterable[int], now: float) -> list[int]:
        """The running workers to blame for a stall (empty: none)."""
        if not self.timeout:
            return []
        running = list(running)
        if self.independent:
            return self._stalled_alone(running, now)
        if any(self.quiet_for(i, now) < self.timeout for i in running):
            return []
        if not any((self.progress(i) or Progress()).in_step for i in running):
            return []  # nobody waits: preparing data, saving, evaluating...
        behind = {i: (self.progress(i) or Progress()).behind for i in running}
        last = min(behind.values())
        return [i for i in running if behind[i] == last]

    def _stalled_alone(self, running: list[int], now: float) -> list[int]:
        """Parameter-server workers wait for each other only in meetings: a
        quiet worker is stalled when it is stuck inside a step, or outside
        one (a callback, its input) while another waits for it."""
        states = {i: self.progress(i) or Progress() for i in running}
        someone_waits = any(state.waiting for state in states.values())
        return [
            i
            for i, state in states.items()
            if self.quiet_for(i, now) >= self.timeout
            and not state.waiting
            and (state.in_step or someone_waits)
        ]
