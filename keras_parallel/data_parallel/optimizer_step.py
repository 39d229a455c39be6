"""The optimizer runs once per step, on the gradients of the whole batch.

Keras' TensorFlow optimizer runs `apply` in every replica and all-reduces the
gradients only inside its final update step, after clipping, gradient
accumulation and the moving averages have already worked on each replica's
partial gradient (tensorflow/tensorflow#33929): `clipnorm` then clips the
wrong vector and accumulation fails inside its `tf.cond`. Horovod and
PyTorch DDP reduce before the optimizer sees a gradient; so does this module.

While DataParallel traces a step, the optimizers the step function reaches
answer to `ReplicaStepOptimizer` before their own class (`specialize.py`):
its `apply` hands all replicas' gradients to the strategy in one merge call,
and the strategy reduces them in one batch and runs the original `apply`
once, in cross-replica context, exactly as on one device. Its `scale_loss`
weights each replica's loss by its share of the batch.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from keras_parallel._tf_internal import loss_scale_apply


class ReplicaStepOptimizer:
    """Mixed in before an optimizer's class while DataParallel traces a step.

    The strategy's extended must provide `apply_reduced(apply, grads,
    variables, optimizer)` (cross-replica context) and `replica_loss_weight()`
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
    return strategy.extended.apply_reduced(apply, grads, variables, optimizer)


def _apply_loss_scale(optimizer, grads, variables):
    # Keras' TensorFlow path of LossScaleOptimizer.apply refuses cross-replica
    # context; its backend-neutral path is the one-device logic: one finite
    # check and one loss scale, on the reduced gradients.
    if not optimizer.built:
        optimizer.build(variables)
        optimizer.built = True
    loss_scale_apply(optimizer, grads, variables)
