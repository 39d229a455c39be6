"""`CommunicationMonitor`: bytes a training step puts into collectives."""

from __future__ import annotations

import keras
from absl import logging


class CommunicationMonitor(keras.callbacks.Callback):
    """Adds a training step's bytes to each epoch's logs.

    Reads `strategy.communication_stats()` (DataParallel has it): the logs
    get `bytes_per_step` (what each replica puts into every collective of a
    step: the gradients' reduction and the weights the sharding modes
    gather) and `compression_ratio` (that over the same step without
    compression). Under a strategy without the accounting, or none, it says
    so once and adds nothing.

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
                "(keras_parallel.DataParallel does); no bytes are logged.",
                type(strategy).__name__,
            )

    def on_epoch_end(self, epoch, logs=None):
        if self._stats is None or logs is None:
            return
        stats = self._stats()
        logs["bytes_per_step"] = stats["bytes_per_step"]
        logs["compression_ratio"] = stats["compression_ratio"]

    def get_config(self) -> dict:
        return {}
