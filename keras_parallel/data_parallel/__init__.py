"""Data parallelism: `DataParallel`, on one machine and across workers.

`strategy.py` is the strategy; `engine.py` its replica machinery (the
traced step in `step_tracing.py`), asking the mode chosen at construction
(`modes/`: replicated, sharded, local SGD) what differs between ways of
training; `multi_worker.py` the same on TensorFlow's collective engine;
`batch_split.py` the input,
`optimizer_step.py`, `local_accumulation.py` and `batchnorm.py` what the
traced step puts in place of Keras' per-replica arithmetic,
`element_shards.py` the optimizer state split by rows over the devices,
`ownership.py` the owner device of each variable (for optimizers whose state
cannot be split so), and `cluster.py` the `TF_CONFIG` checks.
"""

from keras_parallel.data_parallel.lost_workers import WorkerFailedError
from keras_parallel.data_parallel.strategy import DataParallel

__all__ = ["DataParallel", "WorkerFailedError"]
