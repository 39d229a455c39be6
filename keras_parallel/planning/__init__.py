"""`plan`: the bytes each device would hold and send under each strategy,
before training, and the cheapest strategy that fits.

`profile.py` measures a model's activations once on one device, per layer;
`state.py` reads its weights and optimizer state; `estimate.py` and
`pipeline_estimate.py` say what each device keeps of them under
DataParallel's sharding modes and PipelineParallel's schedules;
`candidates.py` lists the strategies; `plan.py` is the function and its
result, `table.py` how it prints.
"""

from keras_parallel.planning.candidates import Candidate
from keras_parallel.planning.estimate import DeviceBytes
from keras_parallel.planning.plan import Plan, plan

__all__ = ["Candidate", "DeviceBytes", "Plan", "plan"]
