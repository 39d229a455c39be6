"""In-process all-reduce: every destination device sums the replicas' values.

Each destination device receives a copy of every replica's value and adds
them itself, in replica order, so every device holds a bit-identical result.
Inside a `tf.function` a sum that nothing reads is pruned: when only one
device applies a variable's update (`DataParallel(shard_optimizer=True)`),
only that device's sum runs, and the all-reduce becomes a reduction to the
variable's owner. The collective-op engine is never used, so re-creating a
strategy for a differently shaped model does not collide with stale
collective instances (tensorflow/tensorflow#62790).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib
from tensorflow.python.distribute import cross_device_utils, distribute_utils
from tensorflow.python.distribute import values as values_lib


class LocalSum(tf.distribute.CrossDeviceOps):
    """All-reduce by copying every replica's value to each destination.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy(
        ["CPU:0", "CPU:1"], cross_device_ops=keras_parallel.reduction.LocalSum()
    )
    ```
    """

    def reduce_implementation(
        self, reduce_op, per_replica_value, destinations, options
    ):
        del options
        if cross_device_ops_lib.check_destinations(destinations):
            devices = cross_device_ops_lib.get_devices_from(destinations)
        else:
            devices = cross_device_ops_lib.get_devices_from(per_replica_value)
        parts = list(per_replica_value.values)
        results = []
        for device in devices:
            with tf.device(device):
                total = cross_device_utils.aggregate_tensors_or_indexed_slices(parts)
                if reduce_op == tf.distribute.ReduceOp.MEAN:
                    total = cross_device_utils.divide_by_n_tensors_or_indexed_slices(
                        total, len(parts)
                    )
                results.append(total)
        return distribute_utils.regroup(results, wrap_class=values_lib.Mirrored)

    def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
        return [
            self.reduce_implementation(reduce_op, value, destinations, options)
            for value, destinations in value_destination_pairs
        ]

    def _gather_implementation(self, per_replica_value, destinations, axis, options):
        return cross_device_ops_lib.ReductionToOneDevice()._gather_implementation(
            per_replica_value, destinations, axis, options
        )
