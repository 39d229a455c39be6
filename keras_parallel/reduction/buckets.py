"""Fusing many gradients into few flat buckets, and cutting them apart again.

Reducing 80 small tensors costs 80 reductions, each with its own launch and
synchronisation; the same bytes in one or two buckets cost one or two
(Horovod's tensor fusion, PyTorch DDP's gradient buckets).

A bucket's concatenation waits for all its gradients, so buckets are filled
in the order the backward produces the gradients (`ready_order`): the first
bucket holds the last layers' gradients and can be reduced while the backward
still computes the first layers'. Across workers the order matters more:
TensorFlow's collectives on a device run in the order they were made (they
share an ordering token), so a first bucket that waits for the end of the
backward would hold back every other. PyTorch DDP fills its buckets in the
reverse order of `Model.parameters()` "because DDP expects gradients to
become ready during the backward pass in approximately that order", then
rebuilds them in the order they became ready in the first iteration
(docs/source/notes/ddp.rst, pytorch/pytorch#35137); TensorFlow's
`CollectiveAllReduce` reverses the gradients before packing them
(cross_device_ops.py). Here the traced step's graph gives the order before
the step runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def plan(
    tensors: Sequence[tf.Tensor],
    bucket_bytes: int,
    order: Sequence[int] | None = None,
) -> list[list[int]]:
    """Groups tensors, taken in `order`, into buckets of consecutive tensors
    of one dtype of at most `bucket_bytes` (a larger tensor gets a bucket of
    its own).

    Args:
        tensors: One replica's tensors, with static shapes.
        bucket_bytes: Bucket capacity in bytes.
        order: The indices of `tensors` in the order to fill buckets (e.g.
            `ready_order(tensors)`); None: as given.

    Returns:
        Lists of indices into `tensors`, in filling order.
    """
    buckets: list[list[int]] = []
    size = 0
    for i in range(len(tensors)) if order is None else order:
        tensor = tensors[i]
        nbytes = tensor.shape.num_elements() * tensor.dtype.size
        same_dtype = buckets and tensors[buckets[-1][-1]].dtype == tensor.dtype
        if same_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def ready_order(tensors: Sequence[tf.Tensor]) -> list[int]:
    """The indices of `tensors` in the order a traced step can compute them.

    A tensor comes before those with a longer chain of ops leading to them in
    its graph: an op runs only after every op of every chain to it, so a
    tensor that another one depends on always comes first (the backward's
    last layers' gradients before the first layers'). Ties, and tensors
    outside a graph (eager), come last first: a backward produces the
    gradients of the last variables first.

    Args:
        tensors: Tensors of one graph (a replica's gradients), in variable
            order.

    Returns:
        A permutation of `range(len(tensors))`.
    """
    depth: dict = {}
    chains = [
        _chain_length(t.op, depth) if tf.is_symbolic_tensor(t) else 0 for t in tensors
    ]
    return sorted(range(len(tensors)), key=lambda i: (chains[i], -i))


def _chain_length(op, depth: dict) -> int:
    """The number of ops on the longest chain of data and control inputs
    ending at `op` (0 for an op without inputs), kept in `depth` for every op
    visited; iterative, as backward graphs are thousands of ops deep."""
    stack, inputs_of = [op], {}
    while stack:
        node = stack[-1]
        if node in depth:
            stack.pop()
            continue
        inputs = inputs_of.get(node)
        if inputs is None:
            # First visit: its inputs are counted first. Each op pushes its
            # inputs once, so the walk ends on a cycle (a TF1 while loop) too.
            inputs_of[node] = inputs = [t.op for t in node.inputs]
            inputs += node.control_inputs
            stack.extend(i for i in inputs if i not in depth)
            continue
        stack.pop()
        depth[node] = 1 + max((depth.get(i, -1) for i in inputs), default=-1)
    return depth[op]


def pack(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Flattens and concatenates tensors (on the current device)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unpack(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Cuts `flat` back into tensors shaped like `like`."""
    sizes = [t.shape.num_elements() for t in like]
    return [
        tf.reshape(piece, t.shape)
        for piece, t in zip(tf.split(flat, sizes), like, strict=True)
    ]
