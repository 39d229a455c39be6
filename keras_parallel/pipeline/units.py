"""The order in which stages can take a model's layers, and the groups of
layers that must share a device.

Contiguous stages of a sequence of layers send data only forward when the
sequence is a topological order of the layers' data flow: then no device
waits for a later device, which is what makes the stages a pipeline. For a
Functional model that order comes from its graph: independent branches may
run in any order (Keras runs them by depth, not in the order of
`model.layers`), and a layer called twice with other layers between its
calls (`s(d(s(x)))`) forms a cycle with them, so they go to one device
together. Sequential and subclassed models keep `model.layers`' order; the
stage check (`order.py`) refuses a placement whose data flow goes around a
cycle of devices.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import keras

from keras_parallel._tf_internal import functional_nodes


def stage_units(
    model: keras.Model, layers: Sequence[keras.layers.Layer]
) -> list[list[keras.layers.Layer]]:
    """Groups `layers` into units that each go to one device whole, in an
    order in which contiguous stages of units send data only forward.

    Args:
        model: The model whose layers these are.
        layers: Its layers to split into stages (no InputLayer, none that
            places itself).

    Returns:
        The units in order, each a list of layers (in the order the model
        first calls them). Without shared layers each unit is one layer; for
        a Functional model the order is the one Keras calls them in.
    """
    nodes = functional_nodes(model)
    if nodes is None:
        return [[layer] for layer in layers]
    units = _ordered_components(nodes)
    staged = {id(layer) for layer in layers}
    units = [[layer for layer in unit if id(layer) in staged] for unit in units]
    units = [unit for unit in units if unit]
    placed = {id(layer) for unit in units for layer in unit}
    # Layers the graph never calls go last, each on its own.
    return units + [[layer] for layer in layers if id(layer) not in placed]


def _ordered_components(nodes: list[tuple]) -> list[list]:
    """The strongly connected components of the layer graph `nodes` (calls
    in order, as `(layer, parent layers)`), in a topological order that
    follows the call order where the graph leaves a choice (Kahn's
    algorithm, earliest first call first)."""
    first_call: dict[int, int] = {}
    layer_of: dict[int, object] = {}
    successors: dict[int, set[int]] = {}
    for position, (layer, parents) in enumerate(nodes):
        first_call.setdefault(id(layer), position)
        layer_of[id(layer)] = layer
        successors.setdefault(id(layer), set())
        for parent in parents:
            if id(parent) != id(layer):
                successors.setdefault(id(parent), set()).add(id(layer))
    # Parents never called (InputLayer) have no first call; they only link.
    components = _strong_components(successors)
    component_of = {key: i for i, comp in enumerate(components) for key in comp}
    later: dict[int, set[int]] = {i: set() for i in range(len(components))}
    waiting = [0] * len(components)
    for source, targets in successors.items():
        for target in targets:
            a, b = component_of[source], component_of[target]
            if a != b and b not in later[a]:
                later[a].add(b)
                waiting[b] += 1
    rank = [
        min((first_call[k] for k in comp if k in first_call), default=-1)
        for comp in components
    ]
    ready = [(rank[i], i) for i in range(len(components)) if not waiting[i]]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, i = heapq.heappop(ready)
        members = sorted(
            (k for k in components[i] if k in first_call), key=first_call.get
        )
        ordered.append([layer_of[k] for k in members])
        for j in later[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, (rank[j], j))
    return ordered


def _strong_components(successors: dict[int, set[int]]) -> list[list[int]]:
    """Kosaraju's algorithm, iterative (models can be deeper than Python's
    recursion limit)."""
    finished: list[int] = []
    seen: set[int] = set()
    for start in successors:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(successors[start]))]
        while stack:
            key, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                finished.append(key)
            elif child not in seen:
                seen.add(child)
                stack.append((child, iter(successors.get(child, ()))))
    predecessors: dict[int, list[int]] = {key: [] for key in successors}
    for key, targets in successors.items():
        for target in targets:
            predecessors.setdefault(target, []).append(key)
    components, assigned = [], set()
    for start in reversed(finished):
        if start in assigned:
            continue
        assigned.add(start)
        component, stack = [], [start]
        while stack:
            key = stack.pop()
            component.append(key)
            for source in predecessors.get(key, ()):
                if source not in assigned:
                    assigned.add(source)
                    stack.append(source)
        components.append(component)
    return components
