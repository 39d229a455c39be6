"""Epoch times of several models taking turns, for overhead ratios."""

from __future__ import annotations

import time


def epoch_times(models: dict, x, y, batch_size: int, repeats: int) -> dict:
    """One epoch of every model per round, a different model first each
    round, so that the machine's slow spells fall on all of them alike.

    Returns:
        `{key: [seconds of each round's epoch]}` for the keys of `models`.
    """
    keys = list(models)
    times = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            models[key].fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
            times[key].append(time.perf_counter() - start)
    return times
