"""What each layer with split weights does in a step: its role.

A layer whose weight is split on an output axis is column-parallel: it
computes its shard of the output. One split on an axis its einsum contracts
is row-parallel: it computes a partial sum of the whole output. An Embedding
split by vocabulary looks up the rows it holds (a partial sum); one split by
width its shard of every vector. By default a split layer gives whole tensors
to its neighbours (`gather_output`, `split_input`); a column-parallel Dense
whose only consumer is a row-parallel Dense keeps its shard, as Megatron-LM
pairs them, and so do the projections inside a MultiHeadAttention split by
heads.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_parallel._tf_internal import (
    attention_parts,
    consumers,
    own_weights,
    sublayers,
)
from keras_parallel.tensor_parallel.shards import AxisShards

# The Keras classes whose own `call` MeshParallel knows how to split.
SPLITTABLE = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
)


@dataclasses.dataclass
class Role:
    """How one layer computes with its shards.

    Attributes:
        kind: `"column"`, `"row"`, `"vocabulary"` or `"width"`.
        axis: Output axis of a column (or width) split, input axis of a row
            split (negative: counted from the end).
        enter: Whether a column layer marks its input with Megatron's `f`.
        gather_output: Whether a column layer joins its output shards.
        split_input: Whether a row layer cuts its (whole) input.
    """

    kind: str
    axis: int | None = None
    enter: bool = True
    gather_output: bool = True
    split_input: bool = True


def einsum_axis(spec: str, label: str) -> int:
    """Axis of `label` in one operand of an einsum equation, counted from the
    end (negative), which also holds when "..." stands for leading axes."""
    if spec.endswith("..."):
        raise ValueError(
            f"MeshParallel cannot split an EinsumDense whose operand {spec!r} "
            "ends in '...'; write the equation with '...' first or without it."
        )
    rest = spec.replace("...", "")
    return rest.index(label) - len(rest)


def _einsum_specs(equation: str) -> tuple[str, str, str]:
    operands, output = equation.split("->")
    inputs, kernel = operands.split(",")
    return inputs, kernel, output


def einsum_bias_axis(layer: keras.layers.EinsumDense, kernel_axis: int) -> int | None:
    """The bias axis carrying the kernel's split label, or None."""
    if not layer.bias_axes:
        return None
    _, kernel, output = _einsum_specs(layer.equation)
    label = kernel.replace("...", "")[kernel_axis]
    if label not in output or label not in layer.bias_axes:
        return None
    output = output.replace("...", "")
    first = min(output.find(c) for c in layer.bias_axes)
    return output[first:].index(label)


def inferred_bias_axis(layer, kernel_axis: int) -> int | None:
    """Where a layer's bias must be split to match its kernel split along
    `kernel_axis` (None: replicated)."""
    if type(layer) is keras.layers.Dense:
        return 0 if kernel_axis == 1 else None
    if type(layer) is keras.layers.EinsumDense:
        return einsum_bias_axis(layer, kernel_axis)
    return None


def role_of(layer) -> Role | None:
    """The role of a layer whose weights are split; None for a replicated one.

    Raises:
        ValueError: for a layer whose split MeshParallel cannot compute.
    """
    split = _split_weights(layer)
    if not split:
        return None
    if type(layer) not in SPLITTABLE:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has weights split by "
            f"the layout map ({', '.join(split)}), but MeshParallel splits only "
            "the computation of Keras' own Dense, EinsumDense, Embedding and "
            "MultiHeadAttention layers. Remove the layout_map keys matching "
            "these paths (the weights are then replicated)."
        )
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        raise ValueError(
            f"Layer {layer.name!r} uses LoRA or quantization, which MeshParallel "
            "does not split. Remove its layout_map keys."
        )
    if isinstance(layer, keras.layers.Embedding):
        (sharding,) = split.values()
        return Role("vocabulary") if sharding.axis == 0 else Role("width", axis=-1)
    kernel = layer.kernel.value
    bias = None if layer.bias is None else layer.bias.value
    axis = kernel.sharding.axis
    if type(layer) is keras.layers.Dense:
        column = axis == 1
        role = Role("column", axis=-1) if column else Role("row", axis=-1)
        bias_axis = 0 if column else None
    else:
        inputs, kernel_spec, output = _einsum_specs(layer.equation)
        label = kernel_spec.replace("...", "")[axis]
        if label in output:
            role = Role("column", axis=einsum_axis(output, label))
        else:
            role = Role("row", axis=einsum_axis(inputs, label))
        bias_axis = einsum_bias_axis(layer, axis) if role.kind == "column" else None
    _check_bias(layer, bias, bias_axis)
    return role


def _split_weights(layer) -> dict:
    return {
        v.path: v.value.sharding
        for v in own_weights(layer)
        if isinstance(v.value, AxisShards)
    }


def _check_bias(layer, bias, axis) -> None:
    sharded = isinstance(bias, AxisShards)
    if bias is None or (axis is None and not sharded):
        return
    if sharded and axis is not None and bias.sharding.axis == axis:
        return
    want = f"split on its axis {axis}" if axis is not None else "replicated (None)"
    raise ValueError(
        f"Layer {layer.name!r}: its kernel is split on axis "
        f"{layer.kernel.value.sharding.axis}, so its bias must be {want}; the "
        f"layout map says otherwise for {layer.bias.path!r}. Remove the bias "
        "key (MeshParallel then splits the bias to match) or correct it."
    )


def plan_layers(models) -> dict[int, tuple[object, Role]]:
    """Roles of the layers with split weights in `models`, by `id(layer)`,
    with column/row pairs and attention projections keeping their shards."""
    roles: dict[int, tuple[object, Role]] = {}
    for model in models:
        for layer in [model, *sublayers(model)]:
            role = role_of(layer)
            if role is not None:
                roles[id(layer)] = (layer, role)
    for layer, role in list(roles.values()):
        if type(layer) is keras.layers.Dense and role.kind == "column":
            _pair(layer, role, roles)
    for model in models:
        for layer in [model, *sublayers(model)]:
            if isinstance(layer, keras.layers.MultiHeadAttention):
                _plan_attention(layer, roles)
    return roles


def _pair(layer, role, roles) -> None:
    calls, taking = consumers(layer)
    if calls != 1 or not taking:
        return
    for consumer in taking:
        entry = roles.get(id(consumer))
        if (
            entry is None
            or type(consumer) is not keras.layers.Dense
            or entry[1].kind != "row"
            or consumers(consumer)[0] != 1
        ):
            return
    role.gather_output = False
    for consumer in taking:
        roles[id(consumer)][1].split_input = False


def _plan_attention(layer, roles) -> None:
    projections, output = attention_parts(layer)
    column = [roles.get(id(p)) for p in projections]
    row = roles.get(id(output))
    # Split by heads: every projection's output, and the output projection's
    # input, split on the heads axis (second from the end).
    if (
        row is None
        or (row[1].kind, row[1].axis) != ("row", -2)
        or any(e is None or (e[1].kind, e[1].axis) != ("column", -2) for e in column)
    ):
        return
    # q, k, v (and the gate) keep their heads, the output projection takes
    # them as they are, and the attention runs on each replica's heads.
    for _, role in column:
        role.enter = False
        role.gather_output = False
    row[1].split_input = False
    roles[id(layer)] = (layer, Role("attention"))
