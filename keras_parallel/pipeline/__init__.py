"""Pipeline parallelism: `PipelineParallel`, a model's layers in stages.

`plan.py` and `balance.py` choose each layer's device, `strategy.py` places
the layers and runs the step, `stage_calls.py` is what the traced step calls
in place of the user's `call`s, `microbatch.py` cuts batches into pieces, and
`order.py` checks that the layers run in the order of their stages.
"""

from keras_parallel.pipeline.strategy import ModelParallel, PipelineParallel

__all__ = ["ModelParallel", "PipelineParallel"]
