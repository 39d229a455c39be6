"""`ParameterServer`: asynchronous training of an unchanged `fit` with the
variables on parameter-server tasks."""

from __future__ import annotations

import itertools

import tensorflow as tf

from keras_parallel._tf_internal import OneDeviceExtended, UpdateContext
from keras_parallel.parameter_server import cluster
from keras_parallel.parameter_server.coordination import Meetings, UpdateCounter
from keras_parallel.parameter_server.lost_ps import watch_ps_tasks
from keras_parallel.parameter_server.variables import BytePlacer, shared_variable
from keras_parallel.specialize import keras_step

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
    update's staleness are in `staleness()`. Workers meet where a pass over
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
        variable_partitioner: not implemented in this prototype.

    Example:

    ```python
    strategy = keras_parallel.ParameterServer()
    with strategy.scope():
        model = make_model()
        model.compile("adam", "mse")
    model.fit(x, y, batch_size=64, epochs=3)
    ```
    """

    def __init__(self, cluster_resolver=None, *, variable_partitioner=None):
        if variable_partitioner is not None:
            raise NotImplementedError("variable_partitioner: not in the prototype")
        resolver = cluster.resolve_ps_cluster(cluster_resolver)
        if resolver.task_type == cluster.PS_JOB:
            cluster.serve(resolver)
        super().__init__(ParameterServerExtended(self, resolver))

    @property
    def worker_index(self) -> int:
        return self.extended.worker_index

    @property
    def num_workers(self) -> int:
        return self.extended.num_workers

    def staleness(self) -> dict:
        """This worker's updates and their staleness so far.

        Returns:
            A dict: `updates` (this worker's), `mean_staleness` and
            `max_staleness` (other workers' updates applied between one of
            this worker's reads and its update), `total_updates` (all
            workers').
        """
        return self.extended.updates.stats()

    def __repr__(self) -> str:
        return f"ParameterServer(worker {self.worker_index} of {self.num_workers})"


class ParameterServerExtended(OneDeviceExtended):
    """One replica on this worker's device; variables on the ps tasks."""

    def __init__(self, container_strategy, resolver):
        host = cluster.connect_worker(resolver)
        watch_ps_tasks(resolver.cluster_spec().job_tasks(cluster.PS_JOB))
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

    def _create_variable(self, next_creator, **kwargs):
        colocate_with = kwargs.pop("colocate_with", None)
        if kwargs.get("synchronization") == tf.VariableSynchronization.ON_READ:
            # Metrics: each worker keeps its own, as TensorFlow's parameter
            # servers kept them with the worker.
            with tf.device(self.worker_device):
                return next_creator(**kwargs)
        value = kwargs["initial_value"]
        if callable(value):
            value = value()
        value = tf.convert_to_tensor(value, dtype=kwargs.get("dtype"))
        if colocate_with is not None:
            device = colocate_with.device
        else:
            device = self._placer.place(value.shape, value.dtype)
        name = kwargs.get("name") or "Variable"
        return shared_variable(
            f"{self._prefix}/{next(self._count)}/{name}",
            device,
            value,
            initialize=self.worker_index == 0,
            name=name,
            shape=kwargs.get("shape"),
            trainable=kwargs.get("trainable", True),
            synchronization=kwargs.get(
                "synchronization", tf.VariableSynchronization.AUTO
            ),
            aggregation=kwargs.get("aggregation", tf.VariableAggregation.NONE),
            distribute_strategy=self._container_strategy(),
        )

    def _experimental_distribute_dataset(self, dataset, options):
        distributed = super()._experimental_distribute_dataset(dataset, options)
        return _MeetingDataset(distributed, self.meetings)

    def _own_piece(self, batch):
        """Rows [i*b/n, (i+1)*b/n) of every tensor of a batch of b rows, on
        worker i of n: each worker takes as many steps as one device would,
        on its own part of each batch."""
        index, count = self.worker_index, self.num_workers
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        start, stop = index * size // count, (index + 1) * size // count
        return tf.nest.map_structure(lambda t: t[start:stop], batch)

    def _call_for_each_replica(self, fn, args, kwargs):
        if tf.executing_eagerly():
            return super()._call_for_each_replica(fn, args, kwargs)
        step = keras_step(fn)
        if step is not None and step[1] == "train_step" and self.num_workers > 1:
            # Evaluation and prediction take whole batches: every worker
            # gets the numbers one device would.
            args = self._own_piece(args)
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

    def __init__(self, distributed, meetings: Meetings) -> None:
        self._distributed = distributed
        self._meetings = meetings

    def __iter__(self):
        self._meetings.meet("the start of a pass over the data")
        return iter(self._distributed)

    def __getattr__(self, name):
        return getattr(self._distributed, name)
