"""keras_parallel: use every device of a workstation from an unchanged Keras `fit`.

The public names are imported on first use, so that `keras-parallel launch`
(which runs no TensorFlow itself) starts at once.
"""

import importlib

from keras_parallel._requirements import check_requirements

check_requirements()

__version__ = "0.1.0"

# Public name -> module defining it (a module's own name for subpackages).
_EXPORTS = {
    "DataParallel": "keras_parallel.data_parallel",
    "MeshParallel": "keras_parallel.mesh",
    "ParameterServer": "keras_parallel.parameter_server",
    "ParameterServerLostError": "keras_parallel.parameter_server",
    "ModelParallel": "keras_parallel.pipeline",
    "PipelineParallel": "keras_parallel.pipeline",
    "PowerSGD": "keras_parallel.reduction.powersgd",
    "callbacks": "keras_parallel.callbacks",
    "layers": "keras_parallel.layers",
    "placement_report": "keras_parallel.report",
    "plan": "keras_parallel.planning",
    "reduction": "keras_parallel.reduction",
    "virtual_devices": "keras_parallel.devices",
    "WorkerFailedError": "keras_parallel.data_parallel",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_parallel' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
