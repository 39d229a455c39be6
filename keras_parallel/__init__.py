"""keras_parallel: use every device of a workstation from an unchanged Keras `fit`."""

from keras_parallel._requirements import check_requirements

check_requirements()

from keras_parallel import callbacks, layers, reduction  # noqa: E402
from keras_parallel.devices import virtual_devices  # noqa: E402
from keras_parallel.partition.report import placement_report  # noqa: E402
from keras_parallel.reduction.powersgd import PowerSGD  # noqa: E402
from keras_parallel.strategies.data_parallel import DataParallel  # noqa: E402
from keras_parallel.strategies.model_parallel import ModelParallel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DataParallel",
    "ModelParallel",
    "PowerSGD",
    "callbacks",
    "layers",
    "placement_report",
    "reduction",
    "virtual_devices",
    "__version__",
]
