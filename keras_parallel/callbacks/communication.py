"""`CommunicationMonitor`: what a training step communicates, in the logs."""

from __future__ import annotations

import keras
from absl import logging

# What the logs get of `communication_stats()`, where a strategy reports it.
LOGGED = ("bytes_per_step", "compression_ratio", "mean_staleness", "max_staleness")


class CommunicationMonitor(keras.callbacks.Callback):
    """Adds a training step's communication to each epoch's logs.

    Reads `strategy.communication_stats()`. Under DataParallel the logs get
    `bytes_per_step` (what each replica puts into every collective of a
    step: the gradients' reduction and the weights the sharding modes
    gather) and `compression_ratio` (that over the same step without
    compression); under ParameterServer `mean_staleness` and
    `max_staleness` (other workers' updates applied between this worker's
    read of the variables and its update). Under a strategy without the
    accounting, or none, it says so once and adds nothing.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_parallel.callbacks.CommunicationMonitor()])
    ```
    """

    def on_train_begin(self, logs=None):
        strategy = self.model.distribute_strategy
        self._stats = getattr(strategy, "communication_stats", None)
        if self._stats is None:
            logging.warning(
                "CommunicationMonitor: %s does not report its communication "
                "(keras_parallel.DataParallel and ParameterServer do); nothing "
                "is logged.",
                type(strategy).__name__,
            )

    def on_epoch_end(self, epoch, logs=None):
        if self._stats is None or logs is None:
            return
        stats = self._stats()
        for key in LOGGED:
            if key in stats:
                logs[key] = stats[key]

    def get_config(self) -> dict:
        return {}
