"""Weights split evenly over the replicas, gathered where they are used
(`sharding="parameters"`: ZeRO stage 3, Rajbhandari et al., 2020; PyTorch's
FSDP).

Each trainable weight is a `GatheredRows`: copy r holds the rows of part r
(`rows.row_parts`), and so do its optimizer slots. Inside `strategy.run` a read
of the weight gives the whole weight, gathered from every replica's part; its
gradient is reduce-scattered on the way back, so each replica receives the
sum of its rows' gradients and updates only its part. Outside replicas (saving,
`get_weights`, Keras' optimizer reading state) the weight reads whole, as
every `ShardedVariable`.

A layer's weights are gathered once its call begins and its inputs exist,
and dropped when it returns (`GathersWeights`): reads inside the layer (an
RNN cell's, in a `tf.while_loop`) take the gathered tensor, so that the
gradient's reduce-scatter, which needs the replicas together, runs outside
control flow. TensorFlow keeps a gathered tensor until the backward ops that
read it have run; a plain `Dense` layer's kernel is instead gathered again
for the backward pass once its output gradient exists
(`RegathersDenseKernel`), as PyTorch's FSDP does, so no whole kernel waits
from the forward to the backward pass.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf

from keras_parallel._tf_internal import get_update_replica_id, regroup
from keras_parallel.data_parallel.element_shards import (
    ELEMENTWISE,
    RowShards,
    splits_by_elements,
)
from keras_parallel.reduction.rows import join_rows
from keras_parallel.specialize import own_class, specialized

# Per replica thread: id(weight) -> its gathered tensor, while a layer call
# that gathered it is open.
_OPEN = threading.local()


class GatheredRows(RowShards):
    """A weight whose copy r holds rows part r, read whole inside replicas."""

    def _in_part(self) -> bool:
        # Only one copy's update works on its part.
        return get_update_replica_id() is not None

    def _gathered_here(self) -> bool:
        replica = tf.distribute.get_replica_context()
        return (
            replica is not None
            and replica.strategy is self.distribute_strategy
            and get_update_replica_id() is None
        )

    def value(self):
        return gathered(self) if self._gathered_here() else super().value()

    def read_value(self):
        return gathered(self) if self._gathered_here() else super().read_value()

    def _dense_var_to_tensor(self, dtype=None, name=None, as_ref=False):
        if self._gathered_here():
            return tf.convert_to_tensor(gathered(self), dtype=dtype)
        return super()._dense_var_to_tensor(dtype=dtype, name=name, as_ref=as_ref)

    def _get_as_operand(self):
        if self._gathered_here():
            return gathered(self)
        return super()._get_as_operand()

    def own_part(self) -> tf.Tensor:
        """This replica's part (replica context), read so that the tape
        records the weight."""
        return super().value()


def splits(kwargs: dict) -> bool:
    """Whether variable-creation `kwargs` make a weight that is split: a
    trainable floating-point one (not BatchNormalization's statistics, seeds
    or counters)."""
    dtype = kwargs.get("dtype")
    return (
        kwargs.get("trainable") is not False
        and kwargs.get("synchronization") != tf.VariableSynchronization.ON_READ
        and dtype is not None
        and tf.as_dtype(dtype).is_floating
    )


def require_elementwise(optimizer) -> None:
    """Raises unless `optimizer` updates each element of a weight alone, so
    that each replica can update its rows by itself."""
    if splits_by_elements(optimizer):
        return
    allowed = ", ".join(cls.__name__ for cls in ELEMENTWISE)
    raise ValueError(
        "sharding='parameters' splits every weight by rows and each device "
        f"updates its rows alone, but the optimizer is a "
        f"{type(optimizer).__name__}. It takes Keras' elementwise optimizers: "
        f"{allowed} (not subclasses). Use sharding='gradients' or 'optimizer' "
        "with this optimizer."
    )


def gathered(weight: GatheredRows) -> tf.Tensor:
    """The whole `weight` in this replica: the tensor a layer call gathered,
    or gathered now."""
    open_calls = getattr(_OPEN, "weights", None)
    if open_calls is not None and id(weight) in open_calls:
        return open_calls[id(weight)]
    return _gather(weight)


def _gather(weight: GatheredRows) -> tf.Tensor:
    # The other replicas' parts are variables on this machine: read where
    # they are, with no exchange between replicas, so a forward pass never
    # waits for the others (their layers' losses would mix in Keras' shared
    # lists). Backward, the whole's gradient is reduce-scattered.
    others = _other_parts(weight)

    @tf.custom_gradient
    def gather(part):
        def grad(whole_gradient):
            return _reduce_scatter(weight, whole_gradient)

        parts = [part if other is None else other for other in others]
        return join_rows(parts, weight.full_shape), grad

    return gather(weight.own_part())


def _other_parts(weight: GatheredRows) -> list:
    """The other replicas' parts (None in this replica's place), read now and
    counted as one all-gather of the step."""
    context = tf.distribute.get_replica_context()
    replica = int(tf.get_static_value(context.replica_id_in_sync_group))
    local = replica - weight.distribute_strategy.extended.first_local_replica
    if local == 0:
        weight.distribute_strategy.extended.count_gather(weight)
    return [
        None if i == local else tf.stop_gradient(copy.read_value())
        for i, copy in enumerate(weight.values)
    ]


def _reduce_scatter(weight: GatheredRows, whole_gradient):
    """This replica's rows of the sum over replicas of `whole_gradient`."""
    return tf.distribute.get_replica_context().merge_call(
        lambda strategy, value: regroup(
            strategy.extended.scatter_rows(value, weight.full_shape)
        ),
        args=(whole_gradient,),
    )


def _regathering_matmul(x: tf.Tensor, weight: GatheredRows) -> tf.Tensor:
    """`x @ weight` with the weight gathered for the product and gathered
    again for the backward's (PyTorch FSDP's order): no whole kernel is kept
    from the forward to the backward pass."""
    with tf.control_dependencies([x]):
        # Gathered once x is there, not when the step starts.
        others = _other_parts(weight)
    units = weight.full_shape[-1]

    @tf.custom_gradient
    def matmul(x, part):
        parts = [part if other is None else other for other in others]
        kernel = tf.cast(join_rows(parts, weight.full_shape), x.dtype)
        rows = tf.reshape(x, [-1, x.shape[-1]])
        y = tf.reshape(
            tf.matmul(rows, kernel), tf.concat([tf.shape(x)[:-1], [units]], 0)
        )

        def grad(dy):
            with tf.control_dependencies([dy]):
                again = _other_parts(weight)
                mine = weight.own_part()
            parts = [mine if other is None else other for other in again]
            kernel = tf.cast(join_rows(parts, weight.full_shape), dy.dtype)
            dy_rows = tf.reshape(dy, [-1, units])
            dx = tf.reshape(tf.matmul(dy_rows, kernel, transpose_b=True), tf.shape(x))
            dw = tf.matmul(rows, dy_rows, transpose_a=True)
            return dx, _reduce_scatter(weight, tf.cast(dw, part.dtype))

        y.set_shape(x.shape[:-1].concatenate([units]))
        return y, grad

    return matmul(x, weight.own_part())


@contextlib.contextmanager
def weights_gathered(weights, after=()):
    """Gathers each `GatheredRows` among `weights` (replica context) for the
    block, once the tensors `after` exist; reads of them inside take these
    tensors."""
    outer = getattr(_OPEN, "weights", None)
    current = dict(outer or {})
    with tf.control_dependencies(after):
        for weight in weights:
            value = getattr(weight, "value", weight)
            if isinstance(value, GatheredRows) and id(value) not in current:
                current[id(value)] = _gather(value)
    _OPEN.weights = current
    try:
        yield
    finally:
        _OPEN.weights = outer


def _tensors(structure) -> list:
    return [t for t in tf.nest.flatten(structure) if isinstance(t, tf.Tensor)]


class GathersWeights:
    """Mixed in before a layer's class while a step is traced under
    `sharding="parameters"`: the layer's weights are gathered when its call
    begins (once its inputs are there)."""

    def call(self, *args, **kwargs):
        with weights_gathered(self.weights, after=_tensors((args, kwargs))):
            return super().call(*args, **kwargs)


class RegathersDenseKernel(GathersWeights):
    """`GathersWeights` for a plain `keras.layers.Dense`, whose kernel is
    gathered again for the backward pass instead of being held (Dense's call:
    matmul, bias, activation)."""

    def call(self, inputs, training=None):
        kernel = self.kernel.value
        if not isinstance(inputs, tf.Tensor) or not isinstance(kernel, GatheredRows):
            return super().call(inputs, training=training)
        rest = [w for w in self.weights if w.value is not kernel]
        with weights_gathered(rest, after=[inputs]):
            x = _regathering_matmul(inputs, kernel)
            if self.bias is not None:
                x = x + tf.cast(self.bias, x.dtype)
            if self.activation is not None:
                x = self.activation(x)
        return x


def specialize_gathering(models):
    """A context in which the layers directly under `models` that hold
    split weights gather them when called."""
    plain_dense, others = [], []
    for layer in gathering_layers(models):
        if _is_plain_dense(layer):
            plain_dense.append(layer)
        else:
            others.append(layer)
    stack = contextlib.ExitStack()
    stack.enter_context(specialized(plain_dense, RegathersDenseKernel))
    stack.enter_context(specialized(others, GathersWeights))
    return stack


def _is_plain_dense(layer) -> bool:
    return (
        own_class(layer) is keras.layers.Dense
        and not layer.lora_enabled
        and layer.quantization_mode is None
    )


def gathering_layers(models) -> list:
    """The layers directly under `models` that hold split weights."""
    layers = []
    for model in models:
        for layer in model.layers:
            if any(isinstance(w.value, GatheredRows) for w in layer.weights):
                layers.append(layer)
    return layers
