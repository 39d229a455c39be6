"""What DataParallel's scope does about errors raised inside it: those of an
object made outside `strategy.scope()` say which object and how to fix it, in
place of TensorFlow's "Mixing different tf.distribute.Strategy objects"; a
model without `call()` is built as on one device.

Under a strategy Keras builds a model before `fit` by calling it on symbolic
inputs (`Trainer._symbolic_build`); without a strategy it defers building to
the traced step. A model that defines no `call()` (keras.io's GAN, DCGAN,
WGAN-GP and VAE examples train through their own `train_step`) fails that
symbolic call with "Unable to automatically build the model", although its
sub-models are built and its step runs. The scope lets that one failure go,
which is where Keras' `fit` continues without a strategy: the step builds
what it uses when it is traced.
"""

from __future__ import annotations

import contextlib

import keras

from keras_parallel._tf_internal import DistributedVariable

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
            if _without_call(error):
                return
            if _MIXING not in str(error):
                raise
            raise ValueError(_message(_culprit(error))) from error


def _frames(error: BaseException):
    """(function name, its `self`) of each frame `error` passed, outermost
    first."""
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        yield frame.f_code.co_name, frame.f_locals.get("self")
        traceback = traceback.tb_next


def _without_call(error: RuntimeError) -> bool:
    """Whether `error` is Keras' symbolic build failing on a model that
    defines no `call()`."""
    return any(
        name == "_symbolic_build"
        and isinstance(owner, keras.Model)
        and type(owner).call is keras.Model.call
        for name, owner in _frames(error)
    )


def _culprit(error: BaseException) -> object | None:
    """The Keras optimizer whose method raised `error`, if any."""
    found = None
    for _, owner in _frames(error):
        if isinstance(owner, keras.optimizers.Optimizer):
            found = owner
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
        '(an optimizer given by name, `optimizer="adam"`, is created by '
        "`compile`, so call `compile` inside the scope)."
    )


def made_outside(variable, strategy: str) -> str:
    """The error for a model's `variable` made outside `strategy`'s scope
    (a class name), with the fix."""
    return (
        f"Variable {variable.name!r} was created outside "
        f"`{strategy}.scope()`, so the strategy does not hold it. Build and "
        "compile the model inside the scope:\n"
        "    with strategy.scope():\n"
        "        model = ...\n"
        "        model.compile(...)\n"
        "To move an existing model, rebuild it in the scope and copy its "
        "weights: `new = keras.models.clone_model(model)` and "
        "`new.set_weights(model.get_weights())` inside `strategy.scope()`."
    )


def require_distributed(variable, strategy: str) -> None:
    """Raises, with the fix, for a variable made outside `strategy`'s scope
    (a class name)."""
    if not isinstance(variable, DistributedVariable):
        raise ValueError(made_outside(variable, strategy))
