"""`Mode`: how DataParallel trains, as one policy object chosen once.

The engine (`engine.py`) runs replicas, reduces and counts; everything that
differs between ways of training — where variables live, the route a
gradient takes to the optimizer, how an update writes the copies of a
variable, what a traced step does around the replicas — is asked of the
strategy's mode. Adding a way of training is adding one mode module.
"""

from __future__ import annotations

import contextlib


class Mode:
    """The questions the engine asks of a way of training.

    Each method receives the engine (the strategy's extended) as `engine`;
    a mode keeps its own state (owners, parts, copies) and no other object
    consults which mode is in use.
    """

    #: The default of `DataParallel(sync_batch_norm=None)`.
    syncs_batch_norm: bool = True
    #: Whether `MeshParallel` can train in this mode (its batch groups sum
    #: their own gradients, and its split weights are the layout map's).
    serves_mesh: bool = False

    def attach(self, engine) -> None:
        """Called once by the engine the mode serves, when it is made."""
        del engine

    def create_variable(self, engine, next_creator, kwargs: dict):
        """Makes a variable in the strategy's scope.

        Args:
            engine: The strategy's extended; `engine.mirrored(next_creator,
                kwargs)` makes tf.distribute's own mirrored variable.
            next_creator: TensorFlow's next variable creator.
            kwargs: The variable's arguments.

        Returns:
            The variable.
        """
        return engine.mirrored(next_creator, kwargs)

    def apply(self, engine, apply, grads, variables, optimizer):
        """Runs an optimizer's `apply` on the replicas' gradients
        (cross-replica context).

        Args:
            engine: The strategy's extended.
            apply: The optimizer's own `apply`, bound.
            grads: One per-replica gradient (or None) per variable.
            variables: The variables, or None for the optimizer's own.
            optimizer: The optimizer.

        Returns:
            What `apply` returns.
        """
        raise NotImplementedError

    def update(self, engine, var, fn, args, kwargs, group):
        """`StrategyExtended._update`: writes `fn`'s result into `var`.

        Returns:
            What tf.distribute's `_update` returns.
        """
        return engine.mirrored_update(var, fn, args, kwargs, group)

    def step(self, engine, models, sizes, training: bool):
        """A context around the replicas of a traced step.

        Args:
            engine: The strategy's extended.
            models: The Keras models the step reaches.
            sizes: Each local replica's number of samples (tensors), or None.
            training: Whether the step trains (a Keras `train_step` or a
                custom loop), rather than evaluates or predicts.

        Returns:
            A context manager.
        """
        del engine, models, sizes, training
        return contextlib.nullcontext()

    def replica_loss_weight(self, engine, replica):
        """The weight of replica `replica`'s loss in the traced step, or None
        (replica context; `loss_weights.py`)."""
        return engine.loss_weights.for_loss(replica)
