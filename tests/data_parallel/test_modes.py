"""DataParallel's ways of training are policy objects chosen once, at
construction (`keras_parallel/data_parallel/modes/`)."""

import ast
import logging
import pathlib

import pytest
import tensorflow as tf
from transparency import devices

import keras_parallel
from keras_parallel.data_parallel import modes

MODES_DIR = pathlib.Path(modes.__file__).parent
PACKAGE = MODES_DIR.parents[1]


@pytest.mark.parametrize(
    "options, expected, sync_batch_norm",
    [
        ({}, "OptimizerSharded", True),
        ({"sharding": None}, "Replicated", True),
        ({"sharding": "optimizer"}, "OptimizerSharded", True),
        ({"sharding": "gradients"}, "GradientSharded", True),
        ({"sharding": "parameters"}, "ParameterSharded", True),
        ({"sync_every": 4}, "LocalSGD", False),
        ({"sharding": None, "sync_batch_norm": False}, "Replicated", False),
        ({"compression": "bf16"}, "AutoSharding", True),
        ({"compression": "bf16", "sharding": "optimizer"}, "OptimizerSharded", True),
    ],
)
def test_each_option_set_chooses_one_mode(options, expected, sync_batch_norm):
    strategy = keras_parallel.DataParallel(devices(2), **options)
    assert type(strategy.extended.mode).__name__ == expected
    assert strategy.extended.sync_batch_norm is sync_batch_norm


def test_no_module_outside_the_modes_asks_which_mode_runs():
    # A sharding mode's name compared, or a mode class tested, outside
    # `modes/` would be a mode flag consulted elsewhere.
    names = {"optimizer", "gradients", "parameters"}
    mode_classes = {
        name
        for name in dir(modes)
        if isinstance(getattr(modes, name), type)
        and issubclass(getattr(modes, name), modes.Mode)
    }
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if MODES_DIR in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in names
                for side in (node.left, *node.comparators)
                for c in ast.walk(side)
            ):
                offenders.append(f"{path.name}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "isinstance"
                and any(
                    getattr(a, "id", getattr(a, "attr", None)) in mode_classes
                    for a in ast.walk(node.args[1])
                )
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_creation_names_the_strategy_not_mirrored_strategy(caplog):
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            keras_parallel.DataParallel(devices(2))
    finally:
        logger.setLevel(level)
    messages = [r.getMessage() for r in caplog.records]
    assert "Using DataParallel with devices CPU:0, CPU:1" in messages
    assert not [m for m in messages if "MirroredStrategy" in m], messages
