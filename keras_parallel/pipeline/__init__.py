"""Pipeline parallelism: `PipelineParallel`, a model's layers in stages.

`plan.py`, `units.py` and `balance.py` choose each layer's device (`units.py`
orders a graph's layers by their data flow and keeps a layer called twice
with the layers between its calls; `layer_times.py` measures each layer's
time for `partition="time"`), `strategy.py` places the layers and runs
the step, `stage_calls.py` is what the traced step calls in place of the
user's `call`s, `microbatch.py` cuts batches into pieces (`empty_pieces.py`
keeps pieces without samples from the model, `keras_meta.py` carries Keras'
masks and logits across), and `order.py` refuses a placement whose data
flows around a cycle of devices.
"""

from keras_parallel.pipeline.strategy import ModelParallel, PipelineParallel

__all__ = ["ModelParallel", "PipelineParallel"]
