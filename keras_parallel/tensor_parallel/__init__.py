"""The tensor-parallel mechanism both forms share.

`shards.py` cuts a weight along one axis into equal shards (`Sharding`) and
holds it as one `AxisShards` variable under a strategy; `collectives.py`
exchanges per-device tensors (a sum on one device; under MeshParallel,
Megatron-LM's conjugate ops among a model group); `shard_compute.py` is what
a split layer computes on one device's shards (the vocabulary-parallel
lookup; attention split by heads). `keras_parallel.layers` builds layers on
it that hold one Keras variable per shard, each on its device;
`keras_parallel.mesh` (MeshParallel) splits the user's own layers with it,
one replica per device. A building block: it imports no strategy.
"""
