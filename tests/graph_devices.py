"""Op and variable devices of a traced train step."""

from __future__ import annotations

import tensorflow as tf

WRITES = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")


def short(device: str) -> str:
    return device.split("device:")[-1]


def traced_train_step(model, strategy, x, y):
    """Traces `model.train_step` as `fit` runs it; returns the graph's nodes
    (function bodies included) and `{placeholder name: Keras variable}` for
    the variables the step captures."""

    @tf.function
    def step(x, y):
        return strategy.run(model.train_step, args=((x, y),))

    concrete = step.get_concrete_function(tf.constant(x), tf.constant(y))
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node) + [
        node for function in graph_def.library.function for node in function.node_def
    ]
    variables = list(model.variables) + list(model.optimizer.variables)
    by_handle = {id(v.value.handle): v for v in variables}
    captured = {
        internal.op.name: by_handle[id(external)]
        for external, internal in concrete.graph.captures
        if id(external) in by_handle
    }
    return nodes, captured


def variable_writes(nodes, captured):
    """(variable path, device of the op writing it) for every variable write."""
    return [
        (captured[node.input[0]].path, short(node.device))
        for node in nodes
        if node.op in WRITES and node.input[0] in captured
    ]
