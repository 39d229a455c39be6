"""The reference for `DataParallel(sync_every=H)`: one plain Keras model per
replica, each trained on one device on its piece of every global batch, and
every H steps their weights averaged (local SGD) or moved by an outer
optimizer (DiLoCo), in NumPy and plain Keras."""

from __future__ import annotations

import keras
import numpy as np


def train_alone(
    build, make_optimizer, x, y, batch_size, steps, replicas, sync_every, outer=None
):
    """Returns the synchronized weights after `steps` global steps (those of
    the last synchronization) and the replicas' own weights.

    Args:
        build: `build(optimizer)`, a compiled model (seeded the same).
        make_optimizer: A new optimizer for each replica.
        outer: A new outer optimizer, or None for plain averaging.
    """
    models = []
    for _ in range(replicas):
        keras.utils.set_random_seed(0)
        models.append(build(make_optimizer()))
    synchronized = models[0].get_weights()
    trainable = [w.trainable for w in models[0].weights]
    floating = [np.issubdtype(w.dtype, np.floating) for w in synchronized]
    if outer is not None:
        anchors = [
            keras.Variable(w) for w, t in zip(synchronized, trainable, strict=True) if t
        ]
        outer.build(anchors)
    piece = batch_size // replicas
    for step in range(steps):
        start = (step * batch_size) % len(x)
        for r, model in enumerate(models):
            rows = slice(start + r * piece, start + (r + 1) * piece)
            model.train_on_batch(x[rows], y[rows])
        if (step + 1) % sync_every:
            continue
        weights = [m.get_weights() for m in models]
        means = [
            np.mean([w[i] for w in weights], axis=0) if floating[i] else weights[0][i]
            for i in range(len(synchronized))
        ]
        if outer is not None:
            grads = [synchronized[i] - means[i] for i, t in enumerate(trainable) if t]
            outer.apply([keras.ops.convert_to_tensor(g) for g in grads], anchors)
            moved = iter(a.numpy() for a in anchors)
            means = [
                next(moved) if t else m for m, t in zip(means, trainable, strict=True)
            ]
        synchronized = means
        for model in models:
            model.set_weights(synchronized)
    return synchronized, [m.get_weights() for m in models]
