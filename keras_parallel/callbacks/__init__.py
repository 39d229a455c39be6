"""Keras callbacks for parallel training."""

from keras_parallel.callbacks.communication import CommunicationMonitor
from keras_parallel.callbacks.consistency import (
    ReplicaConsistencyCheck,
    ReplicaDivergenceError,
)
from keras_parallel.callbacks.lr_scaling import LinearScalingWarmup
from keras_parallel.callbacks.memory import DeviceMemoryMonitor
from keras_parallel.callbacks.throughput import ThroughputMonitor
from keras_parallel.callbacks.written_once import (
    BackupAndRestore,
    CSVLogger,
    ModelCheckpoint,
    TensorBoard,
)

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "CommunicationMonitor",
    "DeviceMemoryMonitor",
    "LinearScalingWarmup",
    "ModelCheckpoint",
    "ReplicaConsistencyCheck",
    "ReplicaDivergenceError",
    "TensorBoard",
    "ThroughputMonitor",
]
