"""`ParameterServer`: asynchronous training of an unchanged `fit` with the
variables on parameter-server tasks."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import tensorflow as tf

from keras_parallel._tf_internal import (
    OneDeviceExtended,
    UpdateContext,
    making_fit_training_data,
)
from keras_parallel.parameter_server import cluster, partitioned, row_ranges
from keras_parallel.parameter_server.coordination import Meetings, UpdateCounter
from keras_parallel.parameter_server.lost_ps import watch_ps_tasks
from keras_parallel.parameter_server.variables import BytePlacer, shared_variable
from keras_parallel.scope_errors import explained
from keras_parallel.specialize import keras_step, reachable, specialized
from keras_parallel.step_progress import step_counter

# Strategies made in this process, numbered alike on every worker (they run
# the same script), so their variables' shared names agree.
_CREATIONS = itertools.count()


class ParameterServer(tf.distribute.Strategy):
    """Asynchronous data parallelism with the variables on ps tasks.

    Every worker runs the same script: build and compile the model in
    `strategy.scope()`, then the usual `fit`, `evaluate`, `predict`, `save`.
    The variables (and the optimizer's state, next to its variable) live on
    the ps tasks, placed to balance bytes. In `fit`, each worker takes its
    own piece of every batch, computes its gradient and applies the update on the ps
    tasks without waiting for the other workers; the update count and each
    update's staleness are in `communication_stats()`. Workers meet where a pass over
    the data begins or ends (each epoch of `fit`, `evaluate`, `predict`), so
    every worker sees the same variables after `fit`.

    On a ps task, creating the strategy serves that task's variables until
    the process is stopped; it does not return.

    Faults: a worker that stops (killed, or its machine lost) does not stop
    the others: once it has sent no heartbeat for
    `KERAS_PARALLEL_PS_WORKER_TIMEOUT` seconds (default 60) the others
    warn once and no longer wait for it; started again with the same
    `TF_CONFIG` it rejoins, on the variables as they are. A ps task that
    stops ends every worker within seconds with
    `keras_parallel.ParameterServerLostError` naming it: restart the job,
    and `keras_parallel.callbacks.BackupAndRestore` resumes it.

    Args:
        cluster_resolver: the cluster, with `ps` and `worker` jobs; None
            reads `TF_CONFIG`.
        variable_partitioner: None (each weight whole on one ps task), or a
            callable `partitioner(shape, dtype)` returning the number of
            partitions along each axis, as TensorFlow's
            ParameterServerStrategy takes (e.g.
            `tf.distribute.experimental.partitioners.MinSizePartitioner()`).
            A weight it splits is cut along its first axis into row ranges
            on different ps tasks (balanced by bytes); the optimizer's state
            for it is cut alike and updated where its rows live, and an
            Embedding gathers the rows a step needs from the ps tasks holding
            them. Outside a step it is one weight (`get_weights`, saving).

    Example:

    ```python
    strategy = keras_parallel.ParameterServer()
    with strategy.scope():
        model = make_model()
        model.compile("adam", "mse")
    model.fit(x, y, batch_size=64, epochs=3)
    ```
    """

    def __init__(
        self,
        cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
        *,
        variable_partitioner: Callable[[tf.TensorShape, tf.DType], list[int]]
        | None = None,
    ):
        row_ranges.check_partitioner(variable_partitioner)
        resolver = cluster.resolve_ps_cluster(cluster_resolver)
        if resolver.task_type == cluster.PS_JOB:
            cluster.serve(resolver)
        super().__init__(ParameterServerExtended(self, resolver, variable_partitioner))

    @property
    def worker_index(self) -> int:
        return self.extended.worker_index

    @property
    def num_workers(self) -> int:
        return self.extended.num_workers

    @property
    def found_variables(self) -> bool:
        """Whether this worker found the model's variables already on the ps
        tasks (a worker other than 0, or worker 0 started again while the ps
        tasks kept running) rather than initialising them: only then is
        there nothing to restore from a backup."""
        return self.extended.found_variables

    def communication_stats(self) -> dict:
        """This worker's updates of the shared variables so far, and their
        staleness (`keras_parallel.callbacks.CommunicationMonitor` logs the
        staleness each epoch).

        Returns:
            A dict: `updates` (this worker's), `mean_staleness` and
            `max_staleness` (other workers' updates applied between one of
            this worker's reads and its update), `total_updates` (all
            workers').

        Example:

        ```python
        model.fit(x, y, epochs=3)
        strategy.communication_stats()["mean_staleness"]  # 0.0 on one worker
        ```
        """
        return self.extended.updates.stats()

    def scope(self):
        """The strategy's scope, with errors of objects made outside it
        explained and models without `call()` built as on one device
        (`keras_parallel.scope_errors`)."""
        return explained(super().scope())

    def __repr__(self) -> str:
        return f"ParameterServer(worker {self.worker_index} of {self.num_workers})"


class ParameterServerExtended(OneDeviceExtended):
    """One replica on this worker's device; variables on the ps tasks."""

    def __init__(self, container_strategy, resolver, variable_partitioner=None):
        # Watched from before connecting: TensorFlow waits for ever for a ps
        # task that never starts.
        watch_ps_tasks(resolver.cluster_spec().job_tasks(cluster.PS_JOB))
        host = cluster.connect_worker(resolver)
        self.worker_device = f"{host}/device:CPU:0"
        super().__init__(container_strategy, self.worker_device)
        self.worker_index = resolver.task_id
        self.num_workers = len(resolver.cluster_spec().job_tasks(cluster.WORKER_JOB))
        devices = cluster.ps_devices(resolver)
        self._placer = BytePlacer(devices)
        self._prefix = f"keras_parallel/{next(_CREATIONS)}"
        self._count = itertools.count()
        self.updates = UpdateCounter(
            self._prefix, devices[0], self.worker_index, self.worker_device
        )
        self.meetings = Meetings(
            self._prefix,
            devices[0],
            self.num_workers,
            self.worker_index,
            self.updates.steps,
        )
        self._step_updates = None
        self._partitioner = variable_partitioner
        self.found_variables = self.worker_index != 0
        # Steps and meetings counted for `keras-parallel launch`, which names
        # a worker that makes no progress while another waits for it.
        self.step_counter = step_counter(self.worker_device)

    def _create_variable(self, next_creator, **kwargs):
        # Made eagerly even inside a traced step (keras.io's GAN builds its
        # optimizers' slots in its first `train_step`): the shared resource is
        # made and initialised on the ps once, as TensorFlow lifts the
        # initialisation of a variable created in a tf.function.
        value = kwargs["initial_value"]
        if not callable(value) and tf.is_symbolic_tensor(value):
            raise ValueError(
                "ParameterServer makes its variables on the ps tasks when they "
                f"are created, but variable {kwargs.get('name')!r} was given a "
                "value computed inside a traced function. Give it an initializer "
                "(a callable), or create it before the first step."
            )
        with tf.init_scope():
            return self._create_eagerly(next_creator, **kwargs)

    def _create_eagerly(self, next_creator, **kwargs):
        colocate_with = kwargs.pop("colocate_with", None)
        value = kwargs["initial_value"]
        if callable(value):
            value = value()
        value = tf.convert_to_tensor(value, dtype=kwargs.get("dtype"))
        if _worker_local(kwargs, value.dtype):
            with tf.device(self.worker_device):
                return next_creator(**{**kwargs, "initial_value": value})
        name = kwargs.get("name") or "Variable"
        settings = dict(
            initialize=self.worker_index == 0,
            name=name,
            trainable=kwargs.get("trainable", True),
            synchronization=kwargs.get(
                "synchronization", tf.VariableSynchronization.AUTO
            ),
            aggregation=kwargs.get("aggregation", tf.VariableAggregation.NONE),
            distribute_strategy=self._container_strategy(),
        )
        shared_name = f"{self._prefix}/{next(self._count)}/{name}"
        shards = row_ranges.row_ranges(
            self._partitioner, self._placer, value, colocate_with
        )
        if shards:
            parts = [
                self._shared(
                    f"{shared_name}/part_{k}",
                    device,
                    value[start:stop],
                    **{**settings, "name": f"{name}/part_{k}", "trainable": False},
                )
                for k, (device, start, stop) in enumerate(shards)
            ]
            settings.pop("initialize")
            return partitioned.PartitionedVariable(
                parts,
                local_device=self.worker_device,
                unique_id=shared_name,
                **settings,
            )
        if isinstance(colocate_with, partitioned.PartitionedVariable):
            device = colocate_with.shards[0].device
        elif colocate_with is not None:
            device = colocate_with.device
        else:
            device = self._placer.place(value.shape, value.dtype)
        return self._shared(
            shared_name, device, value, shape=kwargs.get("shape"), **settings
        )

    def _shared(self, *args, **kwargs):
        variable = shared_variable(*args, **kwargs)
        self.found_variables |= variable.found
        return variable

    def _experimental_distribute_dataset(self, dataset, options):
        if (
            dataset.cardinality() == tf.data.INFINITE_CARDINALITY
            and making_fit_training_data()
        ):
            raise ValueError(
                "ParameterServer cannot train on an endless dataset: its "
                "workers meet when a pass over the data ends, so that after "
                "`fit` every worker sees every worker's updates, and `fit` "
                "with `steps_per_epoch` on an endless dataset never ends one. "
                "Give `fit` one epoch's data instead, e.g. "
                "`model.fit(dataset.take(steps_per_epoch), epochs=...)` "
                "(Keras starts a new pass every epoch; leave out "
                "`steps_per_epoch`). Received a dataset of infinite "
                "cardinality."
            )
        distributed = super()._experimental_distribute_dataset(dataset, options)
        return _MeetingDataset(distributed, self.meetings, self.step_counter)

    def _own_piece(self, batch):
        """Rows [i*b/n, (i+1)*b/n) of every tensor of a batch of b rows, on
        worker i of n, and how many rows that is: each worker takes as many
        steps as one device would, on its own part of each batch."""
        index, count = self.worker_index, self.num_workers
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        start, stop = index * size // count, (index + 1) * size // count
        piece = tf.nest.map_structure(lambda t: t[start:stop], batch)
        return piece, stop - start

    def _call_for_each_replica(self, fn, args, kwargs):
        if tf.executing_eagerly():
            return super()._call_for_each_replica(fn, args, kwargs)
        if self.step_counter is None:
            return self._traced_step(fn, args, kwargs)
        return self.step_counter.counting(lambda: self._traced_step(fn, args, kwargs))

    def _traced_step(self, fn, args, kwargs):
        lookups = partitioned.partitioned_lookups(reachable(fn, args))
        with specialized(lookups, partitioned.PartitionedLookup):
            step = keras_step(fn)
            if step is None or step[1] != "train_step" or self.num_workers == 1:
                # Evaluation and prediction take whole batches: every worker
                # gets the numbers one device would.
                return self._counted_step(fn, args, kwargs)
            args, rows = self._own_piece(args)
            if tf.get_static_value(rows):
                return self._counted_step(fn, args, kwargs)
            return _unless_empty(
                rows, lambda: self._counted_step(fn, args, kwargs), step[0]
            )

    def _counted_step(self, fn, args, kwargs):
        start = self.updates.read()
        self._step_updates = []
        try:
            # Every read of a variable in the step comes after `start`.
            with tf.control_dependencies([start]):
                result = super()._call_for_each_replica(fn, args, kwargs)
            updates = self._step_updates
        finally:
            self._step_updates = None
        if updates:
            self.updates.applied(start, updates)
        return result

    def _update(self, var, fn, args, kwargs, group):
        # The optimizer's arithmetic runs on the ps task with the variable:
        # one gradient crosses the network, not the slots and the variable.
        with tf.device(var.device), UpdateContext(var.device):
            graph = tf.compat.v1.get_default_graph()
            first = len(graph.get_operations())
            if isinstance(var, partitioned.PartitionedVariable):
                result = partitioned.update_by_shard(var, fn, args, kwargs)
            else:
                result = fn(var, *args, **kwargs)
            if self._step_updates is not None:
                self._step_updates.extend(graph.get_operations()[first:])
            return (
                result if group else tf.nest.map_structure(self._local_results, result)
            )

    @property
    def should_checkpoint(self) -> bool:
        return self.worker_index == 0

    @property
    def should_save_summary(self) -> bool:
        return self.worker_index == 0


class _MeetingDataset:
    """A distributed dataset whose workers meet each time one starts a pass
    over it: Keras starts one at each epoch of `fit` (and starts the next as
    the last step of an epoch ends), and in `evaluate` and `predict`."""

    def __init__(self, distributed, meetings: Meetings, counter) -> None:
        self._distributed = distributed
        self._meetings = meetings
        self._counter = counter

    def __iter__(self):
        waiting = contextlib.nullcontext()
        if self._counter is not None:
            # The launcher sees this worker waiting, not stalled.
            waiting = self._counter.waiting()
        with waiting:
            self._meetings.meet("the start of a pass over the data")
        return iter(self._distributed)

    def __getattr__(self, name):
        return getattr(self._distributed, name)


def _worker_local(kwargs, dtype) -> bool:
    """Whether a new variable stays on this worker: metrics (`ON_READ`), as
    TensorFlow's parameter servers kept them with the worker, and integer
    state of no aggregation that is not trained (a Dropout's seed
    generator), which would otherwise cost every step a ps round trip and
    make the workers draw from one shared random state."""
    if kwargs.get("synchronization") == tf.VariableSynchronization.ON_READ:
        return True
    return (
        dtype.is_integer
        and not kwargs.get("trainable", True)
        and kwargs.get("aggregation", tf.VariableAggregation.NONE)
        == tf.VariableAggregation.NONE
    )


def _unless_empty(rows, step, model):
    """`step()` if this worker's piece of the batch has rows; else no
    update at all, and the model's metrics as they are: a batch smaller
    than the number of workers leaves some pieces empty, whose mean loss is
    NaN."""
    traced = []

    def run():
        traced.append(step())
        return traced[0]

    def skip():
        current = model.get_metrics_result()
        try:
            tf.nest.assert_same_structure(traced[0], current)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "Under ParameterServer a worker skips a step whose piece of "
                "the batch is empty (a batch of fewer rows than workers) and "
                "returns `model.get_metrics_result()`, but this model's "
                "`train_step` returns something else. Return "
                "`self.get_metrics_result()` from `train_step` (as Keras' "
                "does), or give every batch at least as many rows as there "
                f"are workers. Received: {error}"
            ) from error
        return current

    return tf.cond(rows > 0, run, skip)
