"""`communication_stats()` counts every collective of a training step, read
back from the traced step's graph (`graph_collectives.py`), for every
compression and way of training, on the demo convnet and an MLP; a
compression ratio is the step's total over the same step's without
compression."""

from __future__ import annotations

import functools
import logging

import keras
import pytest
import tensorflow as tf
from graph_collectives import collective_bytes
from models import CONV_DATA, MLP_DATA, conv_batchnorm_adam, mlp_sgd_momentum
from transparency import devices

import keras_parallel

COMPRESSIONS = {
    "none": None,
    "fp16": "fp16",
    "bf16": "bf16",
    "powersgd": lambda: keras_parallel.PowerSGD(rank=2),
}
SYNC_EVERY = 2
SETTINGS = {
    "none": {"sharding": None},
    "optimizer": {"sharding": "optimizer"},
    "gradients": {"sharding": "gradients"},
    "parameters": {"sharding": "parameters"},
    "auto": {},
    "local_sgd": {"sharding": None, "sync_every": SYNC_EVERY},
}
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


def mlp():
    # Plain SGD keeps no state to split: "optimizer" updates each weight on
    # its owner device and broadcasts it.
    model = mlp_sgd_momentum()
    model.compile(keras.optimizers.SGD(0.1), model.loss, metrics=["accuracy"])
    return model


MODELS = {
    "convnet": (conv_batchnorm_adam, (CONV_DATA["x"][:8], CONV_DATA["y"][:8])),
    "mlp": (mlp, (MLP_DATA["x"][:8], MLP_DATA["y"][:8])),
}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@functools.cache
def traced(model_name: str, compression: str, setting: str):
    """Traces one training step (Keras' `train_step` in `strategy.run`, as
    `fit` runs it) of `model_name` under `setting` and `compression`.

    Returns:
        (`communication_stats()`, the bytes `collective_bytes` reads per
        replica and step, the warnings logged while tracing).
    """
    build, (x, y) = MODELS[model_name]
    options = SETTINGS[setting]
    made = COMPRESSIONS[compression]
    strategy = keras_parallel.DataParallel(
        devices(2), compression=made() if callable(made) else made, **options
    )
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build()
        # What `fit` builds before its first step: metrics and optimizer.
        model.compute_metrics(x, y, model(x))
        model.optimizer.build(model.trainable_variables)

    @tf.function
    def step(data):
        return strategy.run(model.train_step, args=(data,))

    handler = _Messages()
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        graph = step.get_concrete_function((tf.constant(x), tf.constant(y))).graph
    finally:
        logger.removeHandler(handler)
    steps = SYNC_EVERY if setting == "local_sgd" else 1
    measured = {
        kind: put_in / steps for kind, put_in in collective_bytes(graph, 2).items()
    }
    return strategy.communication_stats(), measured, handler.messages


def _accepted(compression, setting) -> bool:
    return compression != "powersgd" or setting not in ("gradients", "parameters")


PAIRS = [
    (model, compression, setting)
    for model in MODELS
    for compression in COMPRESSIONS
    for setting in SETTINGS
    if _accepted(compression, setting)
]


@pytest.mark.parametrize("model, compression, setting", PAIRS)
def test_the_counts_are_the_bytes_entering_the_collectives(model, compression, setting):
    stats, measured, messages = traced(model, compression, setting)
    for kind in KINDS:
        assert stats[f"{kind}_bytes_per_step"] == pytest.approx(measured[kind]), kind
    total = sum(measured.values())
    assert stats["bytes_per_step"] == pytest.approx(total)
    assert stats["warmup_bytes_per_step"] == pytest.approx(total)
    # The same step without compression, what the ratio divides by: "auto"
    # with a compression runs as None on CPUs, whose memory TensorFlow does
    # not report.
    runs = "none" if setting == "auto" and compression != "none" else setting
    _, uncompressed, _ = traced(model, "none", runs)
    assert stats["uncompressed_bytes_per_step"] == pytest.approx(
        sum(uncompressed.values())
    )
    assert stats["compression_ratio"] == pytest.approx(
        total / stats["uncompressed_bytes_per_step"]
    )
    # A sharding chosen with a compression says what its gathers add.
    explicit = setting in ("optimizer", "gradients", "parameters")
    gathered = measured["all_gather"] + measured["broadcast"]
    if compression != "none" and explicit:
        (message,) = messages
        assert f"{gathered:,.0f} bytes more" in message
        assert f"{total - gathered:,.0f} bytes per step" in message
        assert "Pass sharding=None" in message
    else:
        assert not messages


@pytest.mark.parametrize("model", sorted(MODELS))
def test_auto_with_a_compression_adds_no_uncompressed_gather(model):
    for compression in ("fp16", "bf16", "powersgd"):
        auto, _, _ = traced(model, compression, "auto")
        replicated, _, _ = traced(model, compression, "none")
        assert auto["all_gather_bytes_per_step"] == 0
        assert auto["bytes_per_step"] == replicated["bytes_per_step"]
    # Without compression "auto" keeps each small weight's state whole on an
    # owner device, which sends the updated weight to the others: broadcasts,
    # no gathers of row parts (padded), the gradients' reduction unchanged.
    _, auto, _ = traced(model, "none", "auto")
    _, sharded, _ = traced(model, "none", "optimizer")
    assert auto["all_gather"] == 0 and auto["broadcast"] > 0
    assert auto["all_reduce"] == sharded["all_reduce"]
    assert auto["broadcast"] <= sharded["all_gather"] + sharded["broadcast"]


@pytest.mark.parametrize("setting", ["gradients", "parameters"])
def test_powersgd_cannot_reduce_scatter(setting):
    with pytest.raises(ValueError) as raised:
        keras_parallel.DataParallel(
            devices(2), compression=keras_parallel.PowerSGD(rank=2), sharding=setting
        )
    message = str(raised.value)
    assert f"sharding={setting!r} reduce-scatters gradients" in message
    assert "Use sharding='optimizer' with it" in message
