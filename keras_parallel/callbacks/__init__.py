"""Keras callbacks for parallel training."""

from keras_parallel.callbacks.communication import CommunicationMonitor
from keras_parallel.callbacks.consistency import (
    ReplicaConsistencyCheck,
    ReplicaDivergenceError,
)
from keras_parallel.callbacks.lr_scaling import LinearScalingWarmup
from keras_parallel.callbacks.memory import DeviceMemoryMonitor
from keras_parallel.callbacks.throughput import ThroughputMonitor

__all__ = [
    "CommunicationMonitor",
    "DeviceMemoryMonitor",
    "LinearScalingWarmup",
    "ReplicaConsistencyCheck",
    "ReplicaDivergenceError",
    "ThroughputMonitor",
]
