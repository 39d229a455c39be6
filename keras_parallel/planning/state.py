"""The bytes of a model's weights, gradients and optimizer state, and what
each strategy keeps of them on one device.

Read from the one-device clone after its step was traced (its optimizer is
then built): each variable's shape and dtype, and which optimizer variables
serve which weight (Keras names a slot after its weight's path). The rules
are those of the strategies: DataParallel's sharded modes cut a value by
rows into N equal parts, the last zero-padded (`reduction/rows.py`);
PipelineParallel keeps each layer's weights and slots on its stage.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from keras_parallel.data_parallel.element_shards import splits_by_elements
from keras_parallel.placement import stage_layers
from keras_parallel.planning.profile import layer_of


@dataclasses.dataclass(frozen=True)
class Weight:
    """One model variable.

    Attributes:
        layer: Index of its top-level layer, or None.
        bytes: Its size.
        rows: Its first dimension (1 for a scalar).
        trainable: Whether the optimizer updates it.
        splits: Whether `sharding="parameters"` splits it (trainable and
            floating-point).
        kernel: Whether it is a plain `Dense` layer's kernel (gathered
            again for the backward under `sharding="parameters"`).
        held_whole: Whether `sharding="parameters"` keeps it gathered from
            the forward to the backward: a split weight of rank 2 or more
            that its layer (not a plain `Dense`, not a sublayer) reads
            itself, such as a convolution's kernel.
        slots: Bytes and rows of each optimizer variable kept for it.
    """

    layer: int | None
    bytes: int
    rows: int
    trainable: bool
    splits: bool
    kernel: bool
    held_whole: bool
    slots: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class ModelState:
    """The variables of a model and of its optimizer.

    Attributes:
        weights: The model's variables.
        other_optimizer_bytes: The optimizer's variables that serve no
            weight (its step count, learning rate).
        elementwise: Whether the optimizer's state can be split by rows
            (`element_shards.ELEMENTWISE`).
        plain_dense: Indices of the layers that are plain `Dense` layers.
    """

    weights: tuple[Weight, ...]
    other_optimizer_bytes: int
    elementwise: bool
    plain_dense: frozenset

    def of_layers(self, layers) -> list[Weight]:
        """The weights of the layers with the given indices."""
        return [w for w in self.weights if w.layer in layers]


def model_state(clone: keras.Model) -> ModelState:
    """The `ModelState` of a clone made by `profile.one_device_clone`,
    whose optimizer is built.

    Args:
        clone: The clone.

    Returns:
        Its `ModelState`.
    """
    optimizer = clone.optimizer
    slot_vars = list(optimizer.variables)
    prefixes = {id(v): v.path.replace("/", "_") + "_" for v in clone.weights}
    served: dict[int, list] = {}
    for slot in slot_vars:
        owners = [v for v in clone.weights if slot.name.startswith(prefixes[id(v)])]
        if owners:
            owner = max(owners, key=lambda v: len(prefixes[id(v)]))
            served.setdefault(id(owner), []).append(slot)
    used = {id(s) for slots in served.values() for s in slots}
    plain = frozenset(
        i for i, layer in enumerate(stage_layers(clone)) if is_plain_dense(layer)
    )
    weights = []
    for v in clone.weights:
        layer = layer_of(v.path + "/")
        weights.append(
            Weight(
                layer=layer,
                bytes=variable_bytes(v),
                rows=_rows(v),
                trainable=v.trainable,
                splits=v.trainable and "float" in str(v.dtype),
                kernel=layer in plain and v.path.endswith("/kernel"),
                held_whole=(
                    v.trainable
                    and len(v.shape) >= 2
                    and layer not in plain
                    and layer_of(v.path.split("/")[-2] + "/") is not None
                ),
                slots=tuple(
                    (variable_bytes(s), _rows(s)) for s in served.get(id(v), [])
                ),
            )
        )
    return ModelState(
        weights=tuple(weights),
        other_optimizer_bytes=sum(
            variable_bytes(s) for s in slot_vars if id(s) not in used
        ),
        elementwise=splits_by_elements(optimizer),
        plain_dense=plain,
    )


def is_plain_dense(layer) -> bool:
    """Whether `layer` is a plain `keras.layers.Dense` (no subclass, LoRA or
    quantization): `sharding="parameters"` gathers its kernel again for its
    backward."""
    return (
        type(layer) is keras.layers.Dense
        and not layer.lora_enabled
        and layer.quantization_mode is None
    )


def variable_bytes(variable) -> int:
    """Bytes of a Keras variable."""
    dtype = tf.as_dtype(keras.backend.standardize_dtype(variable.dtype))
    return math.prod(variable.shape) * dtype.size


def part_bytes(total: int, rows: int, parts: int) -> int:
    """Bytes of one of `parts` row parts of a value of `total` bytes and
    `rows` rows (`rows.row_parts`: ceil(rows / parts) rows each)."""
    return math.ceil(rows / parts) * (total // rows)


def split_slot_bytes(weight: Weight, parts: int) -> int:
    """Bytes one device keeps of `weight`'s slots split by rows."""
    return sum(part_bytes(b, r, parts) for b, r in weight.slots)


def owned_slot_bytes(weights, parts: int) -> int:
    """The most slot bytes one device owns when each weight's slots go whole
    to the device owning the fewest bytes so far (`ownership.OwnerTable`)."""
    owned = [0] * parts
    for weight in weights:
        slots = sum(b for b, _ in weight.slots)
        if slots:
            owned[owned.index(min(owned))] += slots
    return max(owned)


def _rows(variable) -> int:
    return int(variable.shape[0]) if len(variable.shape) else 1
