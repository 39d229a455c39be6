"""The collectives of a traced step, read from its graph: the bytes each
replica puts into them, to check `communication_stats()` against.

On one machine the reduction engine's collectives are plain ops placed on
the replica devices:
- a sum is an `AddN` on every device of tensors from every device: an
  all-reduce adds the same tensors everywhere, a reduce-scatter adds on
  device r slice r of each;
- an all-gather is a `ConcatV2` on every device of every device's part;
- a broadcast is a variable written from another device's value.
So a collective is found as a set of such ops over the same source tensors,
one on each device; what each replica puts in is the source tensors' bytes
over the number of replicas. Tensors joined on one device only are
TensorFlow's reduction to one device, which the metrics' results and
synchronized BatchNormalization's statistics take (documented as not
counted).
"""

from __future__ import annotations

import collections

JOINS = ("AddN", "ConcatV2")
# Ops whose output is (a part of) their first input, where it lives.
PASS_THROUGH = ("Identity", "StopGradient", "StridedSlice")
READS = ("ReadVariableOp",)


def _short(device: str) -> str:
    return device.split("device:")[-1]


class _Graphs:
    """Resolves each tensor's origin — the device where its data is made and
    its source (a variable, or the tensor itself) — through reads, slices
    and `tf.cond` branches."""

    def __init__(self, graph):
        self.env = {
            internal.ref(): (_short(external.device), ("variable", id(external)))
            for external, internal in graph.captures
        }
        self.joins = collections.defaultdict(list)  # (op type, sources) -> devices
        self.writes = {}  # (source, device) -> bytes
        self.sizes = {}  # source -> bytes
        self._walk(graph)

    def where(self, tensor) -> tuple[str, tuple]:
        """(device, source) of `tensor`."""
        if tensor.ref() in self.env:
            return self.env[tensor.ref()]
        op = tensor.op
        if op.type in READS + PASS_THROUGH:
            # Where the data is made: a read where its variable lives.
            return self.where(op.inputs[0])
        if op.type in ("If", "StatelessIf"):
            branch = op._true_graph
            self._enter(branch, op.inputs[1:])
            return self.where(branch.outputs[tensor.value_index])
        source = ("tensor", id(tensor.graph), tensor.name)
        self.sizes.setdefault(source, _bytes(tensor))
        return _short(op.device), source

    def _enter(self, branch, inputs) -> None:
        for placeholder, outer in zip(branch.inputs, inputs, strict=True):
            self.env[placeholder.ref()] = self.where(outer)

    def _walk(self, graph) -> None:
        for op in graph.get_operations():
            if op.type in ("If", "StatelessIf"):
                for branch in (op._true_graph, op._false_graph):
                    self._enter(branch, op.inputs[1:])
                    self._walk(branch)
            elif op.type in JOINS:
                self._join(op)
            elif op.type == "AssignVariableOp":
                self._write(op)

    def _join(self, op) -> None:
        inputs = op.inputs[:-1] if op.type == "ConcatV2" else op.inputs
        placed = [self.where(t) for t in inputs]
        if len({device for device, _ in placed}) < 2:
            return
        for tensor, (_, source) in zip(inputs, placed, strict=True):
            # A variable's bytes are its read's; a slice's source its whole.
            self.sizes.setdefault(source, _bytes(_whole(tensor)))
        sources = frozenset(source for _, source in placed)
        if op.type == "ConcatV2":
            kind = "all_gather"
        elif any(t.op.type == "StridedSlice" for t in inputs):
            kind = "reduce_scatter"  # each device adds its slice of each
        else:
            kind = "all_reduce"
        self.joins[(kind, sources)].append(_short(op.device))

    def _write(self, op) -> None:
        target, _ = self.where(op.inputs[0])
        device, source = self.where(op.inputs[1])
        if device and target and device != target:
            self.writes[(source, target)] = _bytes(op.inputs[1])


def _whole(tensor):
    """The tensor a slice is of (a variable's read, else the first tensor
    that is no identity or slice)."""
    while tensor.op.type in PASS_THROUGH:
        tensor = tensor.op.inputs[0]
    return tensor


def _bytes(tensor) -> int:
    return tensor.shape.num_elements() * tensor.dtype.size


def collective_bytes(graph, num_replicas: int) -> dict[str, float]:
    """Bytes each replica puts into each kind of collective of `graph` (a
    traced step; `tf.cond` branches included, each counted once).

    Returns:
        `{"all_reduce": ..., "reduce_scatter": ..., "all_gather": ...,
        "broadcast": ...}`.
    """
    found = _Graphs(graph)
    kinds = dict.fromkeys(("all_reduce", "reduce_scatter", "all_gather"), 0.0)
    for (kind, sources), devices in found.joins.items():
        if len(devices) % num_replicas or len(set(devices)) < num_replicas:
            continue  # joined on one device: a reduction to one device
        times = len(devices) // num_replicas
        kinds[kind] += times * sum(found.sizes[s] for s in sources) / num_replicas
    sent = {source: size for (source, _), size in found.writes.items()}
    kinds["broadcast"] = sum(sent.values()) / num_replicas
    return kinds
