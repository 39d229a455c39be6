"""`ThroughputMonitor`: samples per second and step time, per epoch."""

from __future__ import annotations

import time
from collections.abc import Callable

import keras

from keras_parallel._validation import check_int


class ThroughputMonitor(keras.callbacks.Callback):
    """Adds `samples_per_second` and `step_time_ms` to each epoch's logs.

    The first `warmup_steps` steps of every epoch are left out (the first
    traces the step function, the next ones warm the input pipeline), so the
    figures describe steady training. Being in `logs`, they appear in the
    progress bar, in `History` and in TensorBoard. Works under any strategy
    and under none.

    Args:
        batch_size: The global batch size given to `fit`.
        warmup_steps: Steps at the start of each epoch that are not timed.
        clock: What the figures are timed by: a function returning seconds
            (by default `time.perf_counter`).

    Example:

    ```python
    history = model.fit(x, y, batch_size=256, epochs=3,
                        callbacks=[keras_parallel.callbacks.ThroughputMonitor(256)])
    history.history["samples_per_second"]
    ```
    """

    def __init__(
        self,
        batch_size: int,
        warmup_steps: int = 2,
        clock: Callable[[], float] = time.perf_counter,
    ):
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.clock = clock

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = None  # (time, steps done)
        if self.warmup_steps == 0:
            self._start = (self.clock(), 0)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run: with steps_per_execution
        # > 1 Keras reports once per group of steps.
        now, done = self.clock(), batch + 1
        if self._start is None:
            if done >= self.warmup_steps:
                self._start = (now, done)
        else:
            self._end = (now, done)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._end is None:
            return  # an epoch no longer than the warm-up: nothing to report
        seconds = self._end[0] - self._start[0]
        steps = self._end[1] - self._start[1]
        logs["step_time_ms"] = 1000 * seconds / steps
        logs["samples_per_second"] = steps * self.batch_size / seconds

    def get_config(self) -> dict:
        return {"batch_size": self.batch_size, "warmup_steps": self.warmup_steps}
