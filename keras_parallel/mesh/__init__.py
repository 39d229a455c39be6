"""Data x tensor parallelism on a device mesh: `MeshParallel`.

`layout.py` reads Keras' DeviceMesh and LayoutMap as replicas and weight
shards, `sharded_variable.py` holds one weight split over the model axis,
`plan.py` gives each layer with split weights its role, `layer_calls.py`
computes those layers on their shards with the exchanges of
`collectives.py`, and `strategy.py` is the strategy.
"""

from keras_parallel.mesh.strategy import MeshParallel

__all__ = ["MeshParallel"]
