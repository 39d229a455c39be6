"""`MeshParallel`: data x tensor parallelism from Keras' own DeviceMesh and
LayoutMap, under an unchanged `fit`."""

from __future__ import annotations

import contextlib
import weakref

import keras
import tensorflow as tf

from keras_parallel._tf_internal import (
    PerReplica,
    keras_scope,
)
from keras_parallel.data_parallel import batch_split
from keras_parallel.data_parallel.cluster import resolve_cluster
from keras_parallel.data_parallel.local_accumulation import is_accumulator
from keras_parallel.data_parallel.modes import choose_mode
from keras_parallel.data_parallel.replica_strategy import ReplicaStrategy
from keras_parallel.data_parallel.strategy import DataParallelExtended
from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.mesh import layer_calls
from keras_parallel.mesh.layout import MeshLayout
from keras_parallel.mesh.plan import inferred_bias_axis, plan_layers
from keras_parallel.reduction.compression import Compression, resolve_compression
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.specialize import specialized
from keras_parallel.tensor_parallel.collectives import MeshExchanges
from keras_parallel.tensor_parallel.shards import AxisShards, create_axis_shards

# Keras class -> the mixin computing its call on shards.
_SPLIT_CALLS = {
    keras.layers.Dense: layer_calls.SplitDense,
    keras.layers.EinsumDense: layer_calls.SplitEinsumDense,
    keras.layers.Embedding: layer_calls.SplitEmbedding,
    keras.layers.MultiHeadAttention: layer_calls.SplitAttention,
}


class MeshParallel(ReplicaStrategy):
    """Data and tensor parallelism on a device mesh described with Keras'
    `keras.distribution` objects, as a JAX user writes them.

    Every device of the mesh is a replica. The batch axis is data
    parallelism: each global batch is cut into one piece per batch index,
    and gradients are summed over the batch axis only, through the reduction
    engine (buckets, fp16/bf16). The model axis is tensor parallelism: a
    weight whose layout names it is split along that dimension, each device
    keeps its shard and the optimizer state of its shard, and the user's
    plain layers compute on their shards: a Dense kernel split on its output
    axis runs column-parallel, on its input axis row-parallel (a column
    layer followed by a row layer exchanges once forward and once backward,
    as in Megatron-LM), an Embedding splits by vocabulary or width,
    EinsumDense and MultiHeadAttention by heads. Biases follow their kernel
    when the layout map does not name them; variables no key matches are
    replicated. `get_weights`, `set_weights` and saving see whole weights,
    so files load without a strategy or under another mesh.

    Args:
        layout: A `keras.distribution.LayoutMap` (its `device_mesh` is the
            mesh), a `keras.distribution.ModelParallel`, a
            `keras.distribution.DataParallel` or a `DeviceMesh` (data
            parallelism only). The mesh has one or two axes; its devices are
            TensorFlow device names (`"cpu:0"`, `"gpu:1"`, ...).
        batch_dim_name: The mesh axis the batch is split over. None: that of
            the Keras distribution object, else the mesh's first axis.
        reduction: As in `DataParallel`.
        bucket_mb: As in `DataParallel`.
        compression: How gradients travel along the batch axis, as in
            `DataParallel`: None, `"fp16"`, `"bf16"` or
            `keras_parallel.PowerSGD(...)` (one error memory per batch
            group, each on its group's devices).
        sharding: `"optimizer"` (default) or None, as in `DataParallel`, for
            replicated weights (split weights keep their optimizer state with
            their shard). `"gradients"` is not available on a mesh: its
            gradients are summed per batch group.
        shard_optimizer: Deprecated, as in `DataParallel`.
        sync_batch_norm: As in `DataParallel`.

    Raises:
        ValueError: for a layout naming an axis that is not the mesh's model
            axis, a mesh of more than two axes, a device that does not
            exist, or a cluster in `TF_CONFIG` (MeshParallel runs on one
            machine); at variable creation, for a layout with more
            dimensions than its variable or a split the model axis does not
            divide.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 2), axis_names=("batch", "model"),
        devices=["cpu:0", "cpu:1", "cpu:2", "cpu:3"])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["dense_1/kernel"] = (None, "model")   # column-parallel
    layout_map["dense_2/kernel"] = ("model", None)   # row-parallel
    strategy = keras_parallel.MeshParallel(layout_map, batch_dim_name="batch")
    with strategy.scope():
        model = ...
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=64)
    ```
    """

    def __new__(cls, *args, **kwargs):
        if resolve_cluster(None) is not None:
            raise ValueError(
                "MeshParallel runs on the devices of one machine, but TF_CONFIG "
                "names a cluster of several workers. Unset TF_CONFIG, or use "
                "keras_parallel.DataParallel across workers."
            )
        return super().__new__(cls)

    def __init__(
        self,
        layout: keras.distribution.LayoutMap
        | keras.distribution.ModelParallel
        | keras.distribution.DataParallel
        | keras.distribution.DeviceMesh,
        batch_dim_name: str | None = None,
        *,
        reduction: str = "auto",
        bucket_mb: float | None = None,
        compression: str | Compression | None = None,
        sharding: str | None = "optimizer",
        shard_optimizer: bool | None = None,
        sync_batch_norm: bool = True,
    ):
        mode, sync_batch_norm = choose_mode(
            sharding=sharding,
            shard_optimizer=shard_optimizer,
            compression=resolve_compression(compression),
            sync_every=1,
            outer_optimizer=None,
            sync_batch_norm=sync_batch_norm,
        )
        if not mode.serves_mesh:
            raise ValueError(
                f"MeshParallel takes sharding='optimizer' or None. Received: "
                f"sharding={sharding!r}. Reduce-scattered gradients "
                "('gradients') and split weights ('parameters') are "
                "DataParallel's: on a mesh, split weights with the layout map."
            )
        self._layout = MeshLayout(layout, batch_dim_name)
        extended = self._make_extended(
            list(self._layout.mesh.devices),
            reduction=reduction,
            bucket_mb=bucket_mb,
            compression=compression,
            mode=mode,
            sync_batch_norm=sync_batch_norm,
            # A split layer's exchanges run inside each replica's part of the
            # step, which the per-device compilation would have to leave out.
            jit_compile=False,
        )
        super().__init__(extended)

    def _make_extended(self, devices, reduction, bucket_mb, compression, **updates):
        try:
            devices = resolve_devices(devices)
        except ValueError as error:
            raise ValueError(
                f"The device mesh of shape {self._layout.shape} names the devices "
                f"{list(devices)}. {error} Or make a mesh of the devices there "
                f"are; a mesh of {len(devices)} logical CPUs needs "
                f"keras_parallel.virtual_devices({len(devices)}) first."
            ) from None
        groups = self._layout.mesh.batch_groups()
        return MeshParallelExtended(
            self,
            devices,
            exact=GradientReduction(reduction, bucket_mb, None, devices),
            gradients=GradientReduction(
                reduction, bucket_mb, compression, devices, groups=groups
            ),
            layout=self._layout,
            **updates,
        )

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """(batch axis size, model axis size)."""
        mesh = self._layout.mesh
        return mesh.batch_size, mesh.model_size

    def experimental_local_results(self, value):
        """The values of `value` on this machine's replicas; for a per-replica
        value of a step, one per batch index: the replicas of a model group
        compute the same outputs, and `predict` concatenates these."""
        if isinstance(value, PerReplica):
            m = self._layout.mesh.model_size
            return tuple(value.values[::m])
        return super().experimental_local_results(value)

    def exchanges(self) -> list[dict]:
        """The model-axis exchanges of the step traced last, in order: one
        dict per exchange (kind, axis, phase, elements, bytes per replica)."""
        return [vars(e) for e in self.extended.mesh_exchanges.log]

    def __repr__(self) -> str:
        mesh = self._layout.mesh
        devices = ", ".join(short_device(d) for d in self.extended.worker_devices)
        return (
            f"MeshParallel(mesh={mesh.batch_axis}:{mesh.batch_size} x "
            f"{mesh.model_axis}:{mesh.model_size}, devices=[{devices}])"
        )


class MeshParallelExtended(DataParallelExtended):
    """DataParallel's replicas, with split weights and model-group
    exchanges."""

    def __init__(
        self, container_strategy, devices, exact, gradients, layout, **updates
    ):
        super().__init__(container_strategy, devices, exact, gradients, **updates)
        self._layout = layout
        self.mesh_exchanges = MeshExchanges(
            layout.mesh.model_groups(),
            layout.mesh.model_axis,
            lambda: self.gradient_reduction.algorithm,
        )
        self._roles: dict[int, tuple] = {}
        # Layer -> the axis its kernel was split along, for its bias (made
        # next, while the layer is not yet built).
        self._kernel_axes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # The M replicas of a model group take the same piece of each batch.
        self.replicas_per_piece = layout.mesh.model_size

    def layer_role(self, layer):
        """The role of `layer` in the step being traced, or None."""
        return self._roles.get(id(layer), (None, None))[1]

    def _step_layers(self, models):
        self._roles = plan_layers(models)
        self._layout.warn_unmatched()
        self.mesh_exchanges.log = []
        stack = contextlib.ExitStack()
        stack.callback(self._roles.clear)  # no hold on the layers after the trace
        for cls, mixin in _SPLIT_CALLS.items():
            layers = [layer for layer, _ in self._roles.values() if type(layer) is cls]
            stack.enter_context(specialized(layers, mixin))
        return stack

    # Variables.

    def _create_variable(self, next_creator, **kwargs):
        mesh = self._layout.mesh
        colocate_with = kwargs.get("colocate_with")
        if isinstance(colocate_with, AxisShards):
            if is_accumulator(kwargs):
                raise ValueError(
                    "MeshParallel does not accumulate gradients of split "
                    f"weights ({colocate_with.name!r}): the optimizer's "
                    "`gradient_accumulation_steps` needs replicated weights. "
                    "Use a larger batch, or drop the weight's layout_map key."
                )
            return self._create_slot(next_creator, colocate_with, kwargs)
        if colocate_with is not None:
            return super()._create_variable(next_creator, **kwargs)
        path, owner = keras_scope()
        name = str(kwargs.get("name") or "")
        full_path = f"{path}/{name}" if path else name
        axis = None
        if not self._layout.has_layout(full_path):
            # A variable made outside any layer's scope has no owner (None).
            kernel_axis = (
                self._kernel_axes.get(owner)
                if name == "bias" and owner is not None
                else None
            )
            if kernel_axis is None:
                return super()._create_variable(next_creator, **kwargs)
            axis = inferred_bias_axis(owner, kernel_axis)
            if axis is None:
                return super()._create_variable(next_creator, **kwargs)
        whole = _initial_value(kwargs)
        if axis is None:
            sharding = self._layout.sharding(full_path, whole.shape)
        else:
            sharding = self._layout.check_divisible(full_path, whole.shape, axis)
        kwargs["initial_value"] = whole
        if sharding is None:  # replicated, or a mesh without a model axis
            return super()._create_variable(next_creator, **kwargs)
        if name == "kernel" and owner is not None:
            self._kernel_axes[owner] = sharding.axis
        return create_axis_shards(
            self._container_strategy(),
            next_creator,
            mesh.devices,
            sharding,
            mesh.model_index,
            kwargs,
        )

    def _create_slot(self, next_creator, reference, kwargs):
        whole = _initial_value(kwargs)
        if whole.shape != reference.shape:
            raise ValueError(
                f"The optimizer keeps a variable {kwargs.get('name')!r} of shape "
                f"{tuple(whole.shape)} for the split weight {reference.name!r} "
                f"of shape {tuple(reference.shape)}. MeshParallel splits "
                "optimizer state shaped like its weight (SGD, Adam, AdamW, "
                "RMSprop, Lion, ...), not factored state (Adafactor)."
            )
        kwargs = dict(kwargs, initial_value=whole)
        mesh = self._layout.mesh
        return create_axis_shards(
            self._container_strategy(),
            next_creator,
            mesh.devices,
            reference.sharding,
            mesh.model_index,
            kwargs,
        )

    def _replica_loss_weights(self, sizes):
        # The M replicas of a model group see the same piece and compute the
        # same loss; Keras divides each replica's loss by all B * M replicas.
        weights = batch_split.replica_loss_weights(sizes, len(self._devices))
        if weights is None:
            return None
        return weights * self._layout.mesh.model_size


def _initial_value(kwargs) -> tf.Tensor:
    initial = kwargs["initial_value"]
    with tf.init_scope():
        return tf.convert_to_tensor(
            initial() if callable(initial) else initial, dtype=kwargs.get("dtype")
        )
