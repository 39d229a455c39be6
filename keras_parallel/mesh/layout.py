"""A Keras `DeviceMesh` and `LayoutMap` read as replicas and weight shards.

Every device of the mesh is one replica. Replica `r` sits at batch index
`b = r // M` and model index `m = r % M` (B x M mesh): the replicas of one
batch index form a model group (they hold the shards of one model copy and
see the same piece of the batch), those of one model index a batch group
(they hold the same shard and reduce its gradient).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import keras
import numpy as np

from keras_parallel._tf_internal import distribution_layout_map
from keras_parallel.tensor_parallel.shards import Sharding

# What `MeshParallel` takes: Keras' distribution objects that carry a mesh.
MESH_SOURCES = (
    "keras.distribution.LayoutMap",
    "keras.distribution.ModelParallel",
    "keras.distribution.DataParallel",
    "keras.distribution.DeviceMesh",
)


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The replicas of a B x M mesh.

    Attributes:
        devices: Device of each replica, in replica order (r = b * M + m).
        batch_size: B, the size of the batch (data-parallel) axis.
        model_size: M, the size of the model (tensor-parallel) axis.
        batch_axis: Name of the batch axis.
        model_axis: Name of the model axis, or None for a 1-D mesh.
    """

    devices: tuple[str, ...]
    batch_size: int
    model_size: int
    batch_axis: str
    model_axis: str | None

    def model_index(self, replica: int) -> int:
        return replica % self.model_size

    def model_groups(self) -> list[list[int]]:
        """Replicas holding one model copy: one list per batch index."""
        m = self.model_size
        return [list(range(b * m, (b + 1) * m)) for b in range(self.batch_size)]

    def batch_groups(self) -> list[list[int]]:
        """Replicas holding the same shard: one list per model index."""
        m = self.model_size
        return [list(range(i, m * self.batch_size, m)) for i in range(m)]


class MeshLayout:
    """The mesh and the weight layouts of a Keras distribution object.

    Args:
        source: A `keras.distribution.LayoutMap`, `ModelParallel`,
            `DataParallel` or `DeviceMesh`.
        batch_dim_name: The mesh axis the batch is split over. None: the
            source's own (`ModelParallel`/`DataParallel`), else the first axis.

    Raises:
        TypeError: for another kind of `source`.
        ValueError: for a mesh of more than two axes, or a layout naming an
            axis that is not the mesh's model axis.
    """

    def __init__(self, source, batch_dim_name: str | None = None):
        self._layout_map, mesh, own_batch_axis = _unpack(source)
        axis_names = tuple(mesh.axis_names)
        batch_axis = batch_dim_name or own_batch_axis or axis_names[0]
        if batch_axis not in axis_names:
            raise ValueError(
                f"`batch_dim_name` must be one of the mesh's axes {axis_names}. "
                f"Received: batch_dim_name={batch_axis!r}"
            )
        if len(axis_names) > 2:
            raise ValueError(
                "MeshParallel takes a mesh of one or two axes (batch, and "
                f"model); this one has {len(axis_names)}: {axis_names}, shape "
                f"{tuple(mesh.shape)}. Merge axes into one model axis, e.g. "
                "DeviceMesh(shape=(2, 4), axis_names=('batch', 'model'))."
            )
        model_axes = [a for a in axis_names if a != batch_axis]
        model_axis = model_axes[0] if model_axes else None
        devices = np.asarray(mesh.devices)
        order = [axis_names.index(batch_axis)]
        if model_axis is not None:
            order.append(axis_names.index(model_axis))
        devices = np.transpose(devices, order)
        self.shape = tuple(np.asarray(mesh.devices).shape)
        shape = devices.shape
        self.mesh = Mesh(
            devices=tuple(str(d) for d in devices.reshape(-1)),
            batch_size=int(shape[0]),
            model_size=int(shape[1]) if model_axis else 1,
            batch_axis=batch_axis,
            model_axis=model_axis,
        )
        self._check_layout_axes()
        self._matched: set[str] = set()

    def _check_layout_axes(self) -> None:
        # Keras' LayoutMap already refuses axis names its mesh does not have.
        mesh = self.mesh
        for key in self._keys():
            axes = tuple(self._layout_map[key].axes)
            if mesh.batch_axis in axes:
                raise ValueError(
                    f"layout_map[{key!r}] = {axes} splits a weight over the "
                    f"batch axis {mesh.batch_axis!r}. MeshParallel splits "
                    "weights over the model axis only (the batch axis copies "
                    f"them). Use None or {mesh.model_axis!r} in its place."
                )
            if axes.count(mesh.model_axis) > 1:
                raise ValueError(
                    f"layout_map[{key!r}] = {axes} splits two dimensions over "
                    f"the model axis {mesh.model_axis!r}; a weight can be split "
                    "along one dimension only."
                )

    def _keys(self) -> list[str]:
        return list(self._layout_map) if self._layout_map is not None else []

    def sharding(self, path: str, shape) -> Sharding | None:
        """How the variable at `path` (a Keras variable path) of `shape` is
        split, or None when it is replicated.

        Raises:
            ValueError: when its layout has more dimensions than the variable,
                or the model axis does not divide the split dimension.
        """
        if self._layout_map is None:
            return None
        layout = self._layout_map[path]
        if layout is None:
            return None
        self._matched.update(k for k in self._keys() if _matches(k, path))
        axes = tuple(layout.axes)
        shape = tuple(shape)
        if len(axes) > len(shape):
            raise ValueError(
                f"The layout {axes} for {path!r} has {len(axes)} dimensions, "
                f"but the variable has {len(shape)} (shape {shape}). Give one "
                "entry per dimension, None for those not split."
            )
        if self.mesh.model_size == 1 or self.mesh.model_axis not in axes:
            return None
        axis = axes.index(self.mesh.model_axis)
        return self.check_divisible(path, shape, axis)

    def check_divisible(self, path: str, shape, axis: int) -> Sharding:
        m = self.mesh.model_size
        if shape[axis] % m:
            raise ValueError(
                f"{path!r} has shape {tuple(shape)}; its dimension {axis} "
                f"({shape[axis]}) is split over the model axis "
                f"{self.mesh.model_axis!r} of size {m}, which does not divide "
                f"it. Make that dimension a multiple of {m}, or change the "
                "mesh shape."
            )
        return Sharding(axis, m)

    def has_layout(self, path: str) -> bool:
        return self._layout_map is not None and self._layout_map[path] is not None

    def warn_unmatched(self) -> None:
        """Warns once about layout keys that matched no variable."""
        unmatched = [k for k in self._keys() if k not in self._matched]
        self._matched.update(unmatched)
        if unmatched:
            warnings.warn(
                f"MeshParallel: the layout_map keys {unmatched} match no "
                "variable of the models built in this scope, so nothing is "
                "split by them. Keys are regular expressions matched against "
                "whole variable paths such as 'dense/kernel' (see "
                "`[v.path for v in model.weights]`).",
                stacklevel=3,
            )


def _matches(key: str, path: str) -> bool:
    return key == path or re.fullmatch(key, path) is not None


def _unpack(source):
    """(layout map or None, mesh, batch axis or None) of a Keras object."""
    distribution = keras.distribution
    if isinstance(source, distribution.LayoutMap):
        if source.device_mesh is None:
            raise ValueError(
                "The LayoutMap has no device mesh. Create it as "
                "`keras.distribution.LayoutMap(device_mesh)`."
            )
        return source, source.device_mesh, None
    if isinstance(source, distribution.ModelParallel):
        return (
            distribution_layout_map(source),
            source.device_mesh,
            source.batch_dim_name,
        )
    if isinstance(source, distribution.DataParallel):
        return None, source.device_mesh, source.batch_dim_name
    if isinstance(source, distribution.DeviceMesh):
        return None, source, None
    raise TypeError(
        f"MeshParallel takes one of {', '.join(MESH_SOURCES)}. Received: "
        f"{type(source).__name__} {source!r}"
    )
