"""Refuses a placement whose stages pass data around a cycle of devices.

A pipeline needs each device to pass data only to devices that never pass
data back to it; otherwise a device waits for one that waits for it, and
micro-batches cannot overlap. What counts is the data flow between placed
layers, not the order Python calls them in: Keras runs a Functional model's
independent branches by depth, and a subclassed model may call its layers
in any order, without any cycle.
"""

from __future__ import annotations

import functools

import tensorflow as tf


class StageFlow:
    """Records which placed layers feed which on a model's first run, and
    raises if the data flows around a cycle of stage devices.

    A placed layer feeds another when one of the other's inputs is computed
    from the first's outputs: the same tensor (eagerly), or through any ops
    in between (in a traced step, by walking the graph back).

    Args:
        stages: `{id(layer): (stage index, device)}` for the placed layers.
        given: How the layers were placed, for messages (the `partition`
            argument and the devices).
    """

    def __init__(self, stages: dict[int, tuple[int, str]], given: str):
        self._stages = stages
        self._given = given
        self._calls: list | None = None
        self._checked = False

    def recorded(self, layer, call):
        """Wraps a placed layer's staged `call` to record its inputs and
        outputs while the model's first run is checked."""

        @functools.wraps(call)
        def wrapped(*args, **kwargs):
            outputs = call(*args, **kwargs)
            if self._calls is not None and id(layer) in self._stages:
                self._calls.append((layer, _tensors((args, kwargs)), _tensors(outputs)))
            return outputs

        return wrapped

    def checked(self, call):
        """Wraps the model's call to check its first run."""

        @functools.wraps(call)
        def wrapped(*args, **kwargs):
            if self._checked:
                return call(*args, **kwargs)
            self._calls = []
            try:
                outputs = call(*args, **kwargs)
                calls = self._calls
            finally:
                self._calls = None
            self._check(calls)
            self._checked = True
            return outputs

        return wrapped

    def _check(self, calls: list) -> None:
        # Stage edge -> (feeding layer, fed layer), for the message.
        edges: dict[tuple[int, int], tuple] = {}
        by_id: dict[int, object] = {}
        by_key: dict[tuple, object] = {}
        memo: dict[tuple, frozenset] = {}
        for layer, inputs, outputs in calls:
            stage = self._stages[id(layer)][0]
            for tensor in inputs:
                for source in _sources(tensor, by_id, by_key, memo):
                    edge = (self._stages[id(source)][0], stage)
                    if edge[0] != edge[1]:
                        edges.setdefault(edge, (source, layer))
            for tensor in outputs:
                by_id[id(tensor)] = layer
                if tf.is_symbolic_tensor(tensor):
                    by_key[_key(tensor)] = layer
        cycle = _find_cycle(edges)
        if cycle:
            raise ValueError(self._message([edges[edge] for edge in cycle]))

    def _message(self, feeds: list[tuple]) -> str:
        device = {key: d for key, (_, d) in self._stages.items()}
        steps = ", ".join(
            f"{a.name!r} on {device[id(a)]} feeds {b.name!r} on {device[id(b)]}"
            for a, b in feeds
        )
        names = sorted({layer.name for feed in feeds for layer in feed})
        return (
            "PipelineParallel cannot run this model as a pipeline: its data "
            f"flows around a cycle of devices ({steps}), so each of those "
            "devices would wait for the other. Data may flow from a stage "
            "to any other stage, but never back to one that feeds it. The "
            f"layers were placed by {self._given}. Put the layers {names} "
            "on one device (e.g. `partition` as a dict giving them the same "
            "device), or, if the model calls one layer in two places, use a "
            "separate layer for the second call."
        )


def _tensors(nest) -> list:
    return [x for x in tf.nest.flatten(nest) if isinstance(x, tf.Tensor)]


def _key(tensor) -> tuple:
    return (id(tensor.graph), tensor.name)


def _sources(tensor, by_id: dict, by_key: dict, memo: dict) -> frozenset:
    """The recorded layers whose outputs `tensor` is computed from.

    Eagerly only the same tensor object is recognised; in a graph the ops
    between are walked back (iteratively: a graph can be deeper than
    Python's recursion limit), each tensor once.
    """
    if id(tensor) in by_id:
        return frozenset([by_id[id(tensor)]])
    if not tf.is_symbolic_tensor(tensor):
        return frozenset()
    stack, visiting = [tensor], set()
    while stack:
        current = stack[-1]
        key = _key(current)
        if key in memo:
            stack.pop()
            continue
        if key in by_key:
            memo[key] = frozenset([by_key[key]])
            stack.pop()
            continue
        inputs = list(current.op.inputs)
        pending = [x for x in inputs if _key(x) not in memo]
        if pending and key not in visiting:
            visiting.add(key)
            stack.extend(pending)
            continue
        memo[key] = frozenset().union(*(memo.get(_key(x), frozenset()) for x in inputs))
        stack.pop()
    return memo[_key(tensor)]


def _find_cycle(edges) -> list[tuple[int, int]]:
    """Edges forming one cycle of the directed graph `edges`, or []."""
    successors: dict[int, list[int]] = {}
    for a, b in sorted(edges):
        successors.setdefault(a, []).append(b)
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in sorted(successors):
        if state.get(start):
            continue
        path = [start]
        branches = [iter(successors.get(start, ()))]
        state[start] = 1
        while path:
            child = next(branches[-1], None)
            if child is None:
                state[path.pop()] = 2
                branches.pop()
            elif state.get(child) == 1:
                loop = path[path.index(child) :] + [child]
                return list(zip(loop, loop[1:], strict=False))
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                branches.append(iter(successors.get(child, ())))
    return []
