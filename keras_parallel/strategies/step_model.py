"""Finding the Keras model whose step a strategy is asked to run."""

from __future__ import annotations

import keras


def step_model(step_fn) -> keras.Model | None:
    """The Keras model whose bound method `step_fn` is (Keras runs
    `model.train_step` and the like), seen through the wrappers
    `Strategy.run` adds; None for other functions."""
    while step_fn is not None:
        owner = getattr(step_fn, "__self__", None)
        if isinstance(owner, keras.Model):
            return owner
        step_fn = getattr(step_fn, "__wrapped__", None)
    return None


def captured_model(fn, depth: int = 4) -> keras.Model | None:
    """The Keras model a step function closes over, through the wrappers Keras
    and `Strategy.run` add (Keras' predict step is a local function calling
    `self.predict_step`)."""
    if fn is None or depth == 0:
        return None
    found = captured_model(getattr(fn, "__wrapped__", None), depth - 1)
    for cell in getattr(fn, "__closure__", None) or ():
        if found is not None:
            break
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, keras.Model):
            return value
        if callable(value):
            found = captured_model(value, depth - 1)
    return found
