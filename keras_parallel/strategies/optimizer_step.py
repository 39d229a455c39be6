"""The optimizer runs once per step, on the gradients of the whole batch.

Keras' TensorFlow optimizer runs `apply` in every replica and all-reduces the
gradients only inside its final update step, after clipping, gradient
accumulation and the moving averages have already worked on each replica's
partial gradient (tensorflow/tensorflow#33929): `clipnorm` then clips the
wrong vector and accumulation fails inside its `tf.cond`. Horovod and
PyTorch DDP reduce before the optimizer sees a gradient; so does this module.

While DataParallel traces a step, the optimizers the step function uses
answer to a subclass of their own class (made once per class, never stored on
the instance): its `apply` hands all replicas' gradients to the strategy in
one merge call, and the strategy reduces them in one batch and runs the
original `apply` once, in cross-replica context, exactly as on one device.
Its `scale_loss` weights each replica's loss by its share of the batch. The
instance's own class is restored when the trace ends, also after an error.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import keras
import tensorflow as tf


class ReplicaStepOptimizer:
    """Mixed in before an optimizer's class while DataParallel traces a step.

    The strategy's extended must provide `apply_reduced(apply, grads,
    variables)` (cross-replica context) and `replica_loss_weight()`
    (replica context; a scalar or None).
    """

    def apply(self, grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is None or not hasattr(
            tf.distribute.get_strategy().extended, "apply_reduced"
        ):
            return super().apply(grads, trainable_variables)
        # Lists, so that merge_call regroups each gradient across replicas.
        return context.merge_call(
            _apply_reduced, args=(self, list(grads), _listed(trainable_variables))
        )

    def scale_loss(self, loss):
        extended = tf.distribute.get_strategy().extended
        weight = getattr(extended, "replica_loss_weight", lambda: None)()
        if weight is not None:
            loss = loss * tf.cast(weight, loss.dtype)
        return super().scale_loss(loss)


def _listed(variables):
    return None if variables is None else list(variables)


def _apply_reduced(strategy, optimizer, grads, variables):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        apply = functools.partial(_apply_loss_scale, optimizer)
    else:
        apply = super(ReplicaStepOptimizer, optimizer).apply
    return strategy.extended.apply_reduced(apply, grads, variables)


def _apply_loss_scale(optimizer, grads, variables):
    # Keras' TensorFlow path of LossScaleOptimizer.apply refuses cross-replica
    # context; its backend-neutral path is the one-device logic: one finite
    # check and one loss scale, on the reduced gradients.
    if not optimizer.built:
        optimizer.build(variables)
        optimizer.built = True
    optimizer._common_apply(grads, variables)


_SPECIALIZED: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _specialized(cls: type) -> type:
    if cls not in _SPECIALIZED:
        _SPECIALIZED[cls] = type(
            cls.__name__,
            (ReplicaStepOptimizer, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    return _SPECIALIZED[cls]


@contextlib.contextmanager
def replica_step_optimizers(optimizers):
    """While tracing, `optimizers` answer to their `ReplicaStepOptimizer`
    subclass; afterwards (also on error) to their own class again."""
    swapped = []
    try:
        for optimizer in optimizers:
            cls = type(optimizer)
            if issubclass(cls, ReplicaStepOptimizer):
                continue  # a nested trace of the same step
            # object.__setattr__: Keras' tracking __setattr__ would record the
            # class as a tracked attribute.
            object.__setattr__(optimizer, "__class__", _specialized(cls))
            swapped.append((optimizer, cls))
        yield
    finally:
        for optimizer, cls in swapped:
            object.__setattr__(optimizer, "__class__", cls)


def step_optimizers(fn, depth: int = 4) -> list[keras.optimizers.Optimizer]:
    """The Keras optimizers a step function can reach: its model's (Keras runs
    `model.train_step`), and those in its closures or in the globals its code
    names (a custom loop's `optimizer.apply_gradients`), through the wrappers
    Keras and `Strategy.run` add."""
    found: dict[int, keras.optimizers.Optimizer] = {}
    seen: set[int] = set()

    def visit(value, level):
        if id(value) in seen or level > depth:
            return
        seen.add(id(value))
        if isinstance(value, keras.optimizers.Optimizer):
            found[id(value)] = value
            return
        if isinstance(value, keras.Model):
            optimizer = getattr(value, "optimizer", None)
            if optimizer is not None:
                visit(optimizer, level)
            return
        if not callable(value):
            return
        visit(getattr(value, "__self__", None), level)
        visit(getattr(value, "__wrapped__", None), level + 1)
        visit(getattr(value, "__func__", None), level)
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
    return list(found.values())


def _names(code) -> set[str]:
    """Global and attribute names used by `code` and the functions it nests."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            names |= _names(constant)
    return names
