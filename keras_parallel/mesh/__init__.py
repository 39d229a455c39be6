"""Tensor parallelism: one mechanism, two forms.

`shards.py` cuts a weight along one axis into equal shards (and holds it as
one `AxisShards` variable under a strategy), `collectives.py` exchanges
per-device tensors (sums, joins, Megatron-LM's conjugate ops),
`shard_compute.py` holds what a split layer computes on one device's shards.
The layers of `keras_parallel.layers` build on these with one Keras variable
per shard, placed on its device. `strategy.py` is `MeshParallel`, the SPMD
form: `layout.py` reads Keras' DeviceMesh and LayoutMap as replicas and
shardings, `plan.py` gives each layer with split weights its role, and
`layer_calls.py` computes those layers on their shards. Only `strategy.py`
imports a strategy, so the layers may build on the rest.
"""
