"""Asynchronous training with the variables on parameter-server tasks."""

from keras_parallel.parameter_server.lost_ps import ParameterServerLostError
from keras_parallel.parameter_server.strategy import ParameterServer

__all__ = ["ParameterServer", "ParameterServerLostError"]
