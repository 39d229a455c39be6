"""`ReplicaConsistencyCheck`: that every replica holds the same weights."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_parallel._validation import check_int
from keras_parallel.sharded_variable import ShardedVariable


class ReplicaDivergenceError(RuntimeError):
    """Copies of a mirrored variable differ between replicas."""


class ReplicaConsistencyCheck(keras.callbacks.Callback):
    """Checks every `every_n_steps` training steps that all replica copies of
    every mirrored variable (weights, and optimizer state kept per replica)
    are equal within `tolerance`.

    Synchronous data parallelism keeps the copies identical; a divergence
    means a bug (a custom update that skipped the strategy, a non-
    deterministic op feeding an update) and silently wrong training, so it
    stops training with an error naming the variable and the difference.

    Args:
        every_n_steps: Steps between checks, >= 1.
        tolerance: Largest allowed absolute difference, >= 0.

    Raises:
        ReplicaDivergenceError: on the first check that finds a difference
            above `tolerance`.
    """

    def __init__(self, every_n_steps: int = 100, tolerance: float = 0.0):
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        if not tolerance >= 0:
            raise ValueError(
                f"`tolerance` must be >= 0. Received: tolerance={tolerance!r}"
            )
        self.every_n_steps = every_n_steps
        self.tolerance = tolerance

    def on_train_begin(self, logs=None):
        self._variables = [
            v
            for v in list(self.model.variables) + list(self.model.optimizer.variables)
            if len(getattr(v.value, "values", ())) > 1
            # Copies of split state hold different parts by design.
            and not isinstance(v.value, ShardedVariable)
        ]
        if not self._variables:
            logging.warning(
                "ReplicaConsistencyCheck: the model has no variables copied "
                "across replicas (no data-parallel strategy); nothing to check."
            )

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_n_steps == 0:
            self.check()

    def check(self) -> None:
        """Compares the copies of every mirrored variable now."""
        for variable in self._variables:
            copies = [
                np.asarray(tf.convert_to_tensor(c)) for c in variable.value.values
            ]
            for replica, copy in enumerate(copies[1:], start=1):
                difference = float(np.max(np.abs(copy - copies[0]), initial=0.0))
                if difference > self.tolerance:
                    raise ReplicaDivergenceError(
                        f"Variable {variable.path!r} differs between replica 0 "
                        f"and replica {replica}: max |difference| = "
                        f"{difference:.3g} > tolerance {self.tolerance:g} (at "
                        f"step {int(self.model.optimizer.iterations.numpy())})."
                    )

    def get_config(self) -> dict:
        return {"every_n_steps": self.every_n_steps, "tolerance": self.tolerance}
