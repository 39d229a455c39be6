"""The reference for `DataParallel(sync_every=H)`: one plain Keras model per
replica, each trained on one device on its piece of every global batch, and
every H steps their weights averaged (local SGD) or moved by an outer
optimizer (DiLoCo), in NumPy and plain Keras."""

from __future__ import annotations

import keras
import numpy as np


class ReplicasAlone:
    """Replicas training alone and meeting every `sync_every` steps.

    Args:
        build: `build(optimizer)`, a compiled model (seeded the same).
        make_optimizer: A new optimizer for each replica.
        replicas: How many.
        sync_every: Steps between synchronizations.
        outer: A new outer optimizer, or None for plain averaging.
    """

    def __init__(self, build, make_optimizer, replicas, sync_every, outer=None):
        self.models = []
        for _ in range(replicas):
            keras.utils.set_random_seed(0)
            self.models.append(build(make_optimizer()))
        self.sync_every = sync_every
        self.steps = 0
        self.synchronized = self.models[0].get_weights()
        self._trainable = [w.trainable for w in self.models[0].weights]
        self._outer = outer
        if outer is not None:
            self._anchors = [
                keras.Variable(w)
                for w, t in zip(self.synchronized, self._trainable, strict=True)
                if t
            ]
            outer.build(self._anchors)

    def train(self, x, y, batch_size, steps) -> ReplicasAlone:
        """`steps` batches of `x`, `y` in order, as `fit` makes them (a short
        last batch each epoch), each cut as DataParallel cuts it: the first
        `b % N` replicas one sample more. A replica with no sample does not
        step."""
        starts = list(range(0, len(x), batch_size))
        replicas = len(self.models)
        for step in range(steps):
            start = starts[step % len(starts)]
            size = min(batch_size, len(x) - start)
            pieces = [size // replicas + (r < size % replicas) for r in range(replicas)]
            offset = start
            for model, piece in zip(self.models, pieces, strict=True):
                if piece:
                    rows = slice(offset, offset + piece)
                    model.train_on_batch(x[rows], y[rows])
                offset += piece
            self.steps += 1
            if self.steps % self.sync_every == 0:
                self._synchronize()
        return self

    def set_weights(self, weights) -> None:
        """What `model.set_weights` does between steps: every replica and the
        synchronized weights take `weights`; optimizer states stay."""
        self.synchronized = list(weights)
        for model in self.models:
            model.set_weights(weights)
        if self._outer is not None:
            moved = [w for w, t in zip(weights, self._trainable, strict=True) if t]
            for anchor, w in zip(self._anchors, moved, strict=True):
                anchor.assign(w)

    @property
    def own(self) -> list[list[np.ndarray]]:
        """Each replica's own weights."""
        return [m.get_weights() for m in self.models]

    def _synchronize(self) -> None:
        weights = self.own
        means = [
            np.mean([w[i] for w in weights], axis=0)
            if np.issubdtype(weights[0][i].dtype, np.floating)
            else weights[0][i]
            for i in range(len(self.synchronized))
        ]
        if self._outer is not None:
            grads = [
                keras.ops.convert_to_tensor(s - m)
                for s, m, t in zip(
                    self.synchronized, means, self._trainable, strict=True
                )
                if t
            ]
            self._outer.apply(grads, self._anchors)
            moved = iter(a.numpy() for a in self._anchors)
            means = [
                next(moved) if t else m
                for m, t in zip(means, self._trainable, strict=True)
            ]
        self.synchronized = means
        for model in self.models:
            model.set_weights(means)
