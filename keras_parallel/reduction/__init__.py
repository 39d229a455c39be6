"""Gradient reduction: all-reduce algorithms, bucketing and compression."""

from keras_parallel.reduction.algorithms import (
    AllReduceAlgorithm,
    InProcessAllReduce,
    NcclAllReduce,
)
from keras_parallel.reduction.communicator import Communicator, Transfer
from keras_parallel.reduction.compression import (
    Compression,
    CompressionState,
    HalfPrecision,
    NoCompression,
)
from keras_parallel.reduction.engine import GradientReduction
from keras_parallel.reduction.powersgd import PowerSGD

__all__ = [
    "AllReduceAlgorithm",
    "Communicator",
    "Compression",
    "CompressionState",
    "GradientReduction",
    "HalfPrecision",
    "InProcessAllReduce",
    "NcclAllReduce",
    "NoCompression",
    "PowerSGD",
    "Transfer",
]
