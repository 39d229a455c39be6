"""`LinearScalingWarmup`: the learning rate of large-batch training."""

from __future__ import annotations

import keras

from keras_parallel._validation import check_int


class LinearScalingWarmup(keras.callbacks.Callback):
    """Raises the learning rate linearly to `base_lr` times the number of
    replicas (Goyal et al., 2017, "Accurate, Large Minibatch SGD").

    With N replicas the global batch is N times larger than one device's, so
    the rate scales by N; starting there diverges, so it ramps up from
    `base_lr` over the warm-up (the paper: 5 epochs). The rate is set before
    every training step: at step s of a warm-up of W steps it is
    `base_lr * (1 + (N - 1) * s / W)`, and `base_lr * N` from step W on.

    Args:
        base_lr: The single-device learning rate, > 0.
        warmup_epochs: Warm-up length in epochs (needs `fit`'s steps per
            epoch), or
        warmup_steps: warm-up length in steps. Give exactly one.
        num_replicas: Replicas to scale by; default: the model's strategy's
            `num_replicas_in_sync` (1 without a strategy).
    """

    def __init__(
        self,
        base_lr: float,
        warmup_epochs: int | None = None,
        warmup_steps: int | None = None,
        num_replicas: int | None = None,
    ):
        super().__init__()
        if (
            isinstance(base_lr, bool)
            or not isinstance(base_lr, (int, float))
            or not base_lr > 0
        ):
            raise ValueError(
                f"`base_lr` must be a number > 0. Received: base_lr={base_lr!r}"
            )
        if (warmup_epochs is None) == (warmup_steps is None):
            raise ValueError(
                "Give exactly one of `warmup_epochs` and `warmup_steps`. Received: "
                f"warmup_epochs={warmup_epochs!r}, warmup_steps={warmup_steps!r}"
            )
        for name, value in (
            ("warmup_epochs", warmup_epochs),
            ("warmup_steps", warmup_steps),
        ):
            if value is not None:
                check_int(name, value, 0)
        self.base_lr = float(base_lr)
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.num_replicas = num_replicas

    def on_train_begin(self, logs=None):
        self._replicas = self.num_replicas or getattr(
            self.model.distribute_strategy, "num_replicas_in_sync", 1
        )
        if self.warmup_steps is not None:
            self._warmup = self.warmup_steps
        else:
            steps = self.params.get("steps")
            if steps is None:
                raise ValueError(
                    "LinearScalingWarmup(warmup_epochs=...) needs the number of "
                    "steps per epoch, which fit does not know for this input; "
                    "pass `warmup_steps` instead, or `steps_per_epoch` to fit."
                )
            self._warmup = self.warmup_epochs * steps

    def learning_rate(self, step: int) -> float:
        """The rate this callback sets before training step `step` (from 0)."""
        target = self.base_lr * self._replicas
        if step >= self._warmup:
            return target
        return self.base_lr + (target - self.base_lr) * step / self._warmup

    def on_train_batch_begin(self, batch, logs=None):
        # The optimizer's own step count, so that a resumed fit continues the
        # schedule (with steps_per_execution > 1 the rate is set per group).
        step = int(self.model.optimizer.iterations.numpy())
        self.model.optimizer.learning_rate.assign(self.learning_rate(step))

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "warmup_epochs": self.warmup_epochs,
            "warmup_steps": self.warmup_steps,
            "num_replicas": self.num_replicas,
        }
