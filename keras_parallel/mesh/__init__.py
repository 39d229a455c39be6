"""Data x tensor parallelism on a device mesh: `MeshParallel`.

`layout.py` reads Keras' DeviceMesh and LayoutMap as replicas and weight
shardings, `plan.py` gives each layer with split weights its role,
`layer_calls.py` computes those layers on their shards with the mechanism of
`keras_parallel.tensor_parallel` (shards, collectives, shard computations),
which `keras_parallel.layers` shares, and `strategy.py` is the strategy.
"""

from keras_parallel.mesh.strategy import MeshParallel

__all__ = ["MeshParallel"]
