"""What a strategy changes in the user's objects while it traces a step.

Keras offers no hook between a replica's gradients and the optimizer's
clipping, nor between a BatchNormalization layer and its statistics
(keras-team/keras#20582 and tensorflow/tensorflow#33929 are the failures that
follow). DataParallel therefore has, while it traces a step, the optimizers
and layers the step reaches answer to a subclass of their own class: the
subclass puts one method first (the reduction the strategy needs) and defers
to the user's class for everything else, and says so in its name
(`Adam[ReplicaStepOptimizer]`, `Dense[SplitDense]`). Nothing is set on the
instances, and each object's own class is back when the trace ends, also
after an error; the traced graph keeps the subclass's behaviour.
"""

from __future__ import annotations

import contextlib
import weakref

import keras

_SUBCLASSES: weakref.WeakKeyDictionary[type, dict[type, type]] = (
    weakref.WeakKeyDictionary()
)
# Each made subclass -> the class it was made from.
_MADE_FROM: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def subclass(cls: type, mixin: type) -> type:
    """`cls` with `mixin` first in its method order (made once per pair),
    named `Cls[Mixin]` (as PyTorch's FSDP2 names `FSDPLinear`), so that
    reprs and tracebacks say what runs in the user's class's place."""
    made = _SUBCLASSES.setdefault(cls, {})
    if mixin not in made:
        name = f"{cls.__name__}[{mixin.__name__}]"
        made[mixin] = type(
            name,
            (mixin, cls),
            {
                "__module__": mixin.__module__,
                "__qualname__": f"{cls.__qualname__}[{mixin.__qualname__}]",
            },
        )
        _MADE_FROM[made[mixin]] = cls
    return made[mixin]


def own_class(obj) -> type:
    """The class of `obj` as its user made it, also while it is
    `specialized`."""
    cls = type(obj)
    while cls in _MADE_FROM:
        cls = _MADE_FROM[cls]
    return cls


@contextlib.contextmanager
def specialized(objects, mixin: type):
    """While the context is open, each of `objects` answers to
    `subclass(type(obj), mixin)`; afterwards, also on error, to its own
    class again."""
    swapped = []
    try:
        for obj in objects:
            cls = type(obj)
            if issubclass(cls, mixin):
                continue  # a nested trace of the same step
            # object.__setattr__: Keras' tracking __setattr__ would record
            # the class as a tracked attribute.
            object.__setattr__(obj, "__class__", subclass(cls, mixin))
            swapped.append((obj, cls))
        yield
    finally:
        for obj, cls in swapped:
            object.__setattr__(obj, "__class__", cls)


def reachable(fn, args=(), depth: int = 4) -> list[keras.Model]:
    """The Keras models a step function can reach: its model (Keras runs
    `model.train_step`), those passed in `args`, and those in its closures
    or in the globals its code names (a custom loop's `model(x)`), through
    the wrappers Keras and `Strategy.run` add."""
    models: dict[int, keras.Model] = {}
    seen: set[int] = set()

    def visit(value, level):
        if value is None or id(value) in seen or level > depth:
            return
        seen.add(id(value))
        if isinstance(value, keras.Model):
            models[id(value)] = value
            return
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item, level)
            return
        if isinstance(value, dict):
            for item in value.values():
                visit(item, level)
            return
        if not callable(value):
            return
        visit(getattr(value, "__self__", None), level)
        visit(getattr(value, "__func__", None), level)
        visit(getattr(value, "__wrapped__", None), level + 1)
        visit(getattr(value, "python_function", None), level + 1)
        for cell in getattr(value, "__closure__", None) or ():
            try:
                visit(cell.cell_contents, level + 1)
            except ValueError:  # an empty cell
                pass
        code = getattr(value, "__code__", None)
        scope = getattr(value, "__globals__", None)
        if code is not None and scope is not None:
            for name in _names(code):
                if name in scope:
                    visit(scope[name], level + 1)

    visit(fn, 0)
    visit(args, 0)
    return list(models.values())


def _names(code) -> set[str]:
    """Global and attribute names used by `code` and the functions it nests."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            names |= _names(constant)
    return names


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


_KERAS_STEPS = ("train_step", "test_step", "predict_step")


def keras_step(step_fn) -> tuple[keras.Model, str] | None:
    """The model and the name of its step (`"train_step"`, `"test_step"` or
    `"predict_step"`) that `step_fn` is, bound or called by the local
    function Keras' `predict` runs, seen through the wrappers `Strategy.run`
    adds; None for other functions (a custom loop's)."""
    fn = step_fn
    while fn is not None:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, keras.Model):
            name = getattr(fn, "__name__", None)
            return (owner, name) if name in _KERAS_STEPS else None
        code = getattr(fn, "__code__", None)
        if code is not None:
            called = [step for step in _KERAS_STEPS if step in _names(code)]
            model = captured_model(fn) if called else None
            if model is not None:
                return model, called[0]
        fn = getattr(fn, "__wrapped__", None)
    return None
