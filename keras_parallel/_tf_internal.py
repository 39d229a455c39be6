"""Every TensorFlow and Keras internal keras_parallel relies on, in one place.

tf.distribute documents how to use a strategy but not how to write one: the
extension points (`StrategyExtended`'s underscore hooks, the distributed value
and variable classes) live in `tensorflow.python.distribute`. Keras' hooks
between a layer or optimizer and its arithmetic are underscore methods too.
This module is the only one that imports `tensorflow.python.*` or
`keras.src.*` or touches a private attribute of a TensorFlow or Keras object
(`tests/test_tf_internal.py` fails on one elsewhere); the rest of the package
uses public APIs and the names below.

Checked on TensorFlow 2.21 and Keras 3.15, the range `setup.cfg` declares and
`.ci/run` tests. `HOOKS` lists the private methods our subclasses override or
call; the test checks that each still exists with the arguments we pass.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import keras
import tensorflow as tf
from keras.src.backend.common import global_state, masking, variables
from keras.src.random import seed_generator
from keras.src.saving.keras_saveable import KerasSaveable
from tensorflow.python.distribute import (
    collective_all_reduce_strategy,
    cross_device_ops,
    cross_device_utils,
    distribute_lib,
    distribute_utils,
    input_lib,
    mirrored_strategy,
    one_device_strategy,
    values,
)
from tensorflow.python.eager import record
from tensorflow.python.framework import composite_tensor
from tensorflow.python.ops import (
    control_flow_util,
    handle_data_util,
    resource_variable_ops,
)

# Strategy internals our strategies derive from (`strategies/`): MirroredStrategy's
# replicas on one machine, the collective engine across workers, one device.
MirroredExtended = mirrored_strategy.MirroredExtended
CollectiveAllReduceExtended = collective_all_reduce_strategy.CollectiveAllReduceExtended
CollectiveAllReduceStrategy = collective_all_reduce_strategy.CollectiveAllReduceStrategy
OneDeviceExtended = one_device_strategy.OneDeviceExtended

# Distributed values and variables: what replicas hand each other and what a
# strategy's variable creator returns.
PerReplica = values.PerReplica
PerReplicaSpec = values.PerReplicaSpec
Mirrored = values.Mirrored
DistributedVariable = values.DistributedVariable
MirroredVariable = values.MirroredVariable
SyncOnReadVariable = values.SyncOnReadVariable

# Helpers of the stock strategies that custom `_update`/reductions need to
# return what callers expect.
select_replica = distribute_utils.select_replica
regroup = distribute_utils.regroup
update_regroup = distribute_utils.update_regroup
UpdateContext = distribute_lib.UpdateContext
get_update_replica_id = distribute_lib.get_update_replica_id
enter_or_assert_strategy = distribute_lib.enter_or_assert_strategy
get_devices_from = cross_device_ops.get_devices_from
check_destinations = cross_device_ops.check_destinations
divide_by_n = cross_device_utils.divide_by_n_tensors_or_indexed_slices
aggregate_tensors = cross_device_utils.aggregate_tensors_or_indexed_slices

# A variable over a resource handle we made (`parameter_server/variables.py`):
# TF 2's eager `tf.Variable` always makes an anonymous, per-client resource, and
# workers share a parameter-server variable only through a shared name.
BaseResourceVariable = resource_variable_ops.BaseResourceVariable


def give_handle_shape(handle, shape, dtype) -> None:
    """Records `shape` and `dtype` on an eager resource `handle`, as
    `tf.Variable` does for its own, so reads traced in a tf.function have
    static shapes."""
    data = handle_data_util.create_handle_data(tf.TensorShape(shape), dtype)
    resource_variable_ops._set_handle_shapes_and_types(handle, data, False)


# A weight split by rows over ps tasks (`parameter_server/partitioned.py`) is
# one variable to Keras' gradient tape: a resource handle of its own that holds
# no value, which every read of the shards names as its input on the tape.
variable_accessed = resource_variable_ops.variable_accessed


def placeholder_handle(shape, dtype, device: str, name: str) -> tf.Tensor:
    """A handle on `device` to an anonymous variable resource never written,
    with `shape` and `dtype` recorded on it."""
    with tf.device(device):
        return resource_variable_ops._variable_handle_from_shape_and_dtype(
            shape, dtype, shared_name=None, name=name, graph_mode=False
        )


def record_on_tape(op_type: str, output: tf.Tensor, source: tf.Tensor, backward):
    """Tells the gradient tapes that `output` was computed from `source` and
    that `backward(d_output)` is the gradient of `source`."""
    record.record_operation(
        op_type, [output], [source], backward_function=lambda dy: [backward(dy)]
    )


def making_fit_training_data() -> bool:
    """Whether this call is made while a Keras `fit` makes the iterator over
    its training data. Keras hands a strategy a dataset without saying what
    for; `fit` (`keras/src/backend/tensorflow/trainer.py`) makes the
    training data's iterator, its local `epoch_iterator`, before the
    validation data's."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "fit" and isinstance(
            frame.f_locals.get("self"), keras.Model
        ):
            return "epoch_iterator" not in frame.f_locals
        frame = frame.f_back
    return False


# Keras recognises a distributed dataset by this class (`batch_split.py`);
# our iterator is a composite tensor so that it can enter a tf.function.
DistributedDataset = input_lib.DistributedDataset
CompositeTensor = composite_tensor.CompositeTensor

# Keras' masks travel as a tensor attribute (tensor-parallel attention).
get_keras_mask = masking.get_keras_mask
# Keras' mixed-precision scope: a replayed call (`pipeline/recompute.py`) runs
# outside the layer's `__call__`, which enters it.
AutocastScope = variables.AutocastScope
autocast_scope = variables.get_autocast_scope
set_keras_mask = masking.set_keras_mask


class SavedWithModel(KerasSaveable):
    """Mixed into a strategy whose own state belongs in the checkpoints of the
    models built in its scope (DataParallel's compression memory).

    Keras saves a model by walking its attributes and calling
    `save_own_variables(store)` on every `KerasSaveable` it meets; one of them
    is `distribute_strategy`, the strategy the model was built under. So
    `save_weights`, `ModelCheckpoint` and `BackupAndRestore` save the
    strategy's state under `distribute_strategy/` and `load_weights` hands it
    back to `load_own_variables(store)`; a model built without the strategy
    skips those entries, and one built with it reading a file without them
    gets an empty store.
    """

    def _obj_type(self):
        # Keras picks the attributes it does not walk by this type: a Loss's
        # list, which leaves ours (none of them saveable).
        return "Loss"

    def __reduce__(self):
        # KerasSaveable pickles an object as a Keras model file.
        raise TypeError(f"A {type(self).__name__} strategy cannot be pickled.")


# Private methods overridden (by the subclass named) or called; the test checks
# each on the installed versions.
HOOKS = {
    MirroredExtended: (
        "_call_for_each_replica",
        "_container_strategy",
        "_create_variable",
        "_experimental_distribute_dataset",
        "_get_cross_device_ops",
        "_get_replica_id_in_sync_group",
        "_local_results",
        "_reduce_to",
        "_update",
        "_use_merge_call",
    ),
    CollectiveAllReduceExtended: ("_reduce_to", "_call_for_each_replica"),
    OneDeviceExtended: (
        "_call_for_each_replica",
        "_create_variable",
        "_experimental_distribute_dataset",
        "_update",
    ),
    Mirrored: ("_get_cross_replica",),
    BaseResourceVariable: ("_read_variable_op", "_restore_from_tensors"),
    MirroredVariable: (
        "_dense_var_to_tensor",
        "_get_as_operand",
        "_get_cross_replica",
    ),
    keras.layers.BatchNormalization: ("_moments",),
    # Keras' own attention-mask logic and attention, which
    # ParallelMultiHeadAttention runs on each device's heads.
    keras.layers.MultiHeadAttention: (
        "_build_attention",
        "_compute_attention",
        "_compute_attention_mask",
    ),
    keras.optimizers.LossScaleOptimizer: ("_common_apply",),
    keras.Model: ("_flatten_layers",),
    KerasSaveable: ("_obj_type",),
    tf.distribute.CrossDeviceOps: (
        "_gather_implementation",
        "_num_between_graph_workers",
    ),
}

# Attributes of the stock strategies' extended objects that ours read.
EXTENDED_ATTRIBUTES = (
    "_cross_device_ops",
    "_devices",
    "_input_workers_devices",
    "_num_replicas_in_sync",
)


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA."""
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def collective_server_started() -> bool:
    """Whether this process already runs TensorFlow's collective server."""
    from tensorflow.python.eager import context

    return context.context()._collective_ops_server_def is not None


def wait_for_all_workers(barrier_id: str, timeout_seconds: float) -> None:
    """Blocks until every worker of the cluster reaches `barrier_id`, through
    TensorFlow's coordination service (no collective op involved)."""
    from tensorflow.python.eager import context

    context.context().wait_at_barrier(barrier_id, int(timeout_seconds * 1000))


# Where `keras.callbacks.BackupAndRestore` looks for the weights it restores:
# pointed elsewhere, it takes only the epoch to resume at (`written_once.py`,
# under ParameterServer on a worker whose variables are trained already).
BACKUP_WEIGHTS_PATH = "_weights_path"


def share_among_workers(
    key: str, value: str, worker: int, workers: int, timeout_seconds: float
) -> list[str]:
    """Every worker's `value` for `key`, in worker order, through the
    key-value store of TensorFlow's coordination service (no collective op
    involved); returns once all of them have given theirs."""
    from tensorflow.python.eager import context

    store = context.context()
    store.set_config_key_value(f"{key}/{worker}", value)
    return [
        store.get_config_key_value(f"{key}/{index}", int(timeout_seconds * 1000))
        for index in range(workers)
    ]


def put_shared_value(key: str, value: str) -> None:
    """Sets `key` to `value` in the coordination service's key-value store,
    replacing an earlier value (the store itself refuses to overwrite)."""
    from tensorflow.python.eager import context

    store = context.context()
    with contextlib.suppress(tf.errors.NotFoundError):
        store.delete_config_key_value(key)
    store.set_config_key_value(key, value)


def get_shared_value(key: str, timeout_seconds: float) -> str | None:
    """`key`'s value in the coordination service's key-value store, or None
    when nobody set it within `timeout_seconds`."""
    from tensorflow.python.eager import context

    try:
        return context.context().get_config_key_value(key, int(timeout_seconds * 1000))
    except (tf.errors.DeadlineExceededError, tf.errors.NotFoundError):
        return None


def abort_collectives(message: str) -> None:
    """Makes this process's running and later collectives fail with a
    `DeadlineExceededError` carrying `message`, as the health check of
    `MultiWorkerMirroredStrategy` does when it loses a peer."""
    from tensorflow.python.eager import context

    context.context().abort_collective_ops(tf.errors.DEADLINE_EXCEEDED, message)


def fit_callbacks() -> list:
    """The callbacks given to the Keras `fit` (or `evaluate`) that this call
    is made from, flattened; [] outside one.

    No hook gives a strategy the callbacks of `fit`: Keras' trainer builds its
    `CallbackList` inside `fit` (`keras/src/backend/tensorflow/trainer.py`)
    and neither it nor any callback consults the strategy. This reads, and
    only reads, the `callbacks` argument of the innermost `fit`/`evaluate`
    frame of a Keras model on the stack.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name in ("fit", "evaluate"):
            local = frame.f_locals
            if isinstance(local.get("self"), keras.Model) and "callbacks" in local:
                given = local["callbacks"]
                if isinstance(given, keras.callbacks.CallbackList):
                    return list(given.callbacks)
                return keras.tree.flatten(given) if given else []
        frame = frame.f_back
    return []


def nccl_all_sum(tensors: list) -> list:
    """NCCL all-reduce (sum) of one tensor per GPU (imported on first use:
    it loads the NCCL kernels)."""
    from tensorflow.python.ops import nccl_ops

    return nccl_ops.all_sum(tensors)


def gather_to_one_device(per_replica_value, destinations, axis, options):
    """`CrossDeviceOps.gather` as `tf.distribute.ReductionToOneDevice` does it."""
    return tf.distribute.ReductionToOneDevice()._gather_implementation(
        per_replica_value, destinations, axis, options
    )


def num_workers(extended) -> int:
    """Workers of a collective strategy's cluster."""
    return extended._num_workers


def worker_id(extended) -> int:
    """This process's index among a collective strategy's workers."""
    return extended._id_in_cluster


def sublayers(model: keras.Model) -> list:
    """Every layer inside `model`, nested ones included."""
    return list(model._flatten_layers(include_self=False))


def loss_scale_apply(optimizer, grads, variables) -> None:
    """`LossScaleOptimizer`'s backend-neutral apply: one finite check and one
    loss scale; its TensorFlow path refuses cross-replica context."""
    optimizer._common_apply(grads, variables)


def keras_logits(tensor):
    """The logits Keras' softmax and sigmoid attach to their output, or None."""
    return getattr(tensor, "_keras_logits", None)


def set_keras_logits(tensor, logits) -> None:
    tensor._keras_logits = logits


def local_variable(initial_value, name: str) -> tf.Variable:
    """A variable on the current device only, also inside a strategy's scope
    (`tf.Variable` there would make a mirrored variable)."""
    return resource_variable_ops.ResourceVariable(
        initial_value, trainable=False, name=name
    )


def variable_on(variable: keras.Variable, device: str) -> tf.Variable:
    """A new TensorFlow variable on `device` with the value and settings of
    `variable`'s storage, made directly rather than through `tf.Variable`,
    which a strategy's variable creator would place on its own device."""
    old = variable.value
    with tf.init_scope(), tf.device(device):
        new = resource_variable_ops.ResourceVariable(
            old.read_value(),
            trainable=old.trainable,
            name=variable.name,
            aggregation=old.aggregation,
            synchronization=old.synchronization,
            # Still the strategy's variable: optimizers check that.
            distribute_strategy=old._distribute_strategy,
        )
    # Keras optimizers key their per-variable state by this id.
    new._unique_id = old._unique_id
    return new


def replace_storage(variable: keras.Variable, storage: tf.Variable) -> None:
    """Makes the Keras variable read and write `storage`; layers, optimizers
    and checkpoints keep referring to the same Keras variable."""
    variable._value = storage


def create_mirrored_variable(strategy, make_components, classes, kwargs):
    """A distributed variable of class `classes[synchronization]` over the
    variables `make_components(**kwargs)` returns, made as MirroredStrategy
    makes its own (tape, collections and aggregation checks included)."""
    return distribute_utils.create_mirrored_variable(
        strategy,
        make_components,
        classes,
        distribute_utils.VARIABLE_POLICY_MAPPING,
        **kwargs,
    )


def keras_scope() -> tuple[str, object]:
    """The Keras name-scope path being built and the object (a layer or an
    optimizer) that opened the innermost scope, or ("", None).

    A variable made now gets the path `"{path}/{name}"`; a strategy's variable
    creator sees only the name."""
    stack = global_state.get_global_attribute("name_scope_stack") or []
    parts: list[str] = []
    for entry in stack:
        if entry.override_parent is not None:
            parts = [p for p in entry.override_parent.split("/") if p]
        parts.append(entry.name)
    return "/".join(parts), (stack[-1].caller if stack else None)


def distribution_layout_map(distribution) -> keras.distribution.LayoutMap:
    """The LayoutMap a `keras.distribution.ModelParallel` was made with."""
    return distribution._layout_map


def consumers(layer) -> tuple[int, list]:
    """How many times `layer` was called symbolically (in Functional and
    Sequential models) and the layers that take its outputs."""
    return len(layer._inbound_nodes), [node.operation for node in layer._outbound_nodes]


def attention_parts(layer: keras.layers.MultiHeadAttention) -> tuple[list, object]:
    """A built MultiHeadAttention's input projections (query, key, value, and
    the gate if it has one) and its output projection."""
    parts = [layer._query_dense, layer._key_dense, layer._value_dense]
    if getattr(layer, "_gate_dense", None) is not None:
        parts.append(layer._gate_dense)
    return parts, layer._output_dense


def own_weights(layer: keras.layers.Layer) -> list:
    """The weights a layer made itself, without those of its sublayers."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def update_as(part: tf.Variable, weight) -> None:
    """Makes Keras optimizers take `part` for `weight` when they update it:
    they key a variable's state by its distributed container."""
    part._distributed_container = weakref.ref(weight)


# PipelineParallel: the order a Functional model calls its layers, the losses
# layers add inside a micro-batch's tf.cond, custom gradients' registry, and
# the random state `partition="time"` keeps while it times layers.


def functional_nodes(model) -> list[tuple] | None:
    """The calls a Functional model's `call` makes, in the order it makes
    them (`Function._run_through_graph`: its nodes by depth, deepest first),
    as `(layer, layers whose outputs it takes)`; a shared layer appears once
    per call. None for a model without a graph of nodes (Sequential runs
    `model.layers` in order, a subclassed model its own `call`).
    """
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not isinstance(by_depth, dict):
        return None
    return [
        (node.operation, [parent.operation for parent in node.parent_nodes])
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def global_seed_state() -> keras.Variable | None:
    """The state variable of Keras' global seed generator, which random ops
    without a seed draw from; None while none was made."""
    generator = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    return None if generator is None else generator.state


class TakenLosses:
    """While open, collects the losses `layers` add in `call` (`add_loss`,
    activity regularizers); on closing, takes them out of the layers' lists
    into `losses` as `(layer, loss)`.

    Inside a `tf.cond` branch those tensors cannot be used outside it: the
    branch returns them as outputs and the caller adds those with the public
    `layer.add_loss`, so the layers hold what they would without the cond.
    """

    def __init__(self, layers):
        self._layers = list(layers)
        self._before: list = []
        self.losses: list = []

    def __enter__(self) -> TakenLosses:
        self._before = [(layer, len(layer._losses)) for layer in self._layers]
        return self

    def __exit__(self, *exc_info) -> None:
        for layer, count in self._before:
            self.losses += [(layer, loss) for loss in layer._losses[count:]]
            del layer._losses[count:]


def graph_functions(graph) -> list:
    """The graphs of the functions `graph` calls (nested `tf.function`s,
    cond and loop bodies)."""
    functions = getattr(graph, "_functions", {}).values()
    return [f.graph for f in functions if getattr(f, "graph", None) is not None]


def registered_gradient_names() -> set[str]:
    """Names in TensorFlow's gradient registry. `tf.custom_gradient` inside a
    traced function registers one per call, never removed; its gradient
    function holds the variables and graph it read."""
    from tensorflow.python.framework import ops

    return set(ops._gradient_registry.list())


def unregister_gradients(names) -> None:
    """Removes `names` from TensorFlow's gradient registry (a differentiation
    of their ops after this fails with a LookupError)."""
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry._registry
    for name in names:
        registry.pop(name, None)


def mark_op(op, name: str, value) -> None:
    """Sets attribute `name` of graph operation `op` (a bool or a string)
    while its function is being traced: how TensorFlow's own
    `tf.xla.experimental.jit_scope` marks ops, without its graph-wide scope,
    which replica threads would enter and leave out of order."""
    from tensorflow.core.framework import attr_value_pb2

    if isinstance(value, bool):
        attr = attr_value_pb2.AttrValue(b=value)
    else:
        attr = attr_value_pb2.AttrValue(s=value.encode())
    op._set_attr(name, attr)


def supports_xla(model) -> bool:
    """Keras' own test of whether a model can be XLA-compiled (every layer's
    `supports_jit`, op determinism off)."""
    from keras.src.trainers.trainer import model_supports_jit

    return model_supports_jit(model)


@contextlib.contextmanager
def executed_graphs():
    """Records the graphs TensorFlow runs while the context is open, after
    its optimizations and XLA's clustering: yields a list that holds one
    GraphDef per device partition of each function run when it closes."""
    from tensorflow.python.eager import context

    graphs: list = []
    context.context().enable_run_metadata()
    # Whatever an earlier recording left (exporting clears it).
    context.context().export_run_metadata()
    try:
        yield graphs
    finally:
        metadata = context.context().export_run_metadata()
        context.context().disable_run_metadata()
        for function in metadata.function_graphs:
            graphs.extend(function.partition_graphs)
