"""Errors that say which object was made outside `strategy.scope()` and how
to fix it, in place of TensorFlow's "Mixing different tf.distribute.Strategy
objects"."""

from __future__ import annotations

import contextlib

import keras

_MIXING = "Mixing different tf.distribute.Strategy objects"


@contextlib.contextmanager
def explained(scope):
    """`scope` (a strategy's scope context), with TensorFlow's error for an
    object of another strategy used inside it turned into one naming the
    object and the fix.

    Keras keeps the strategy in scope when an optimizer is made and builds the
    optimizer's slots in that strategy's scope inside `fit`: an optimizer
    made outside the scope (`compile` called outside it, or an instance
    created before it) fails there, before any strategy hook can see it.
    """
    with scope:
        try:
            yield
        except RuntimeError as error:
            if _MIXING not in str(error):
                raise
            raise ValueError(_message(_culprit(error))) from error


def _culprit(error: BaseException) -> object | None:
    """The Keras optimizer whose method raised `error`, if any."""
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if isinstance(owner, keras.optimizers.Optimizer):
            found = owner
        traceback = traceback.tb_next
    return found


def _message(culprit) -> str:
    what = (
        f"The optimizer {culprit.name!r} ({type(culprit).__name__}) was"
        if culprit is not None
        else "An object (usually the optimizer) was"
    )
    return (
        f"{what} created outside the strategy's scope and is used with a "
        "model built inside it: Keras builds an optimizer's state in the "
        "scope it was created in. Create the optimizer and compile inside "
        "the scope:\n"
        "    with strategy.scope():\n"
        "        model = ...\n"
        "        model.compile(optimizer=keras.optimizers.Adam(...), ...)\n"
        "(an optimizer given by name, `optimizer=\"adam\"`, is created by "
        "`compile`, so call `compile` inside the scope)."
    )
