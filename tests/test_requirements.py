"""TensorFlow and Keras versions: the range setup.cfg declares is the one the
checks enforce, older versions are refused with the reason, newer ones warned."""

import configparser
import pathlib
import re
import warnings

import keras
import pytest
import tensorflow as tf
from conftest import run_python

from keras_parallel._requirements import SUPPORTED, check_versions

SETUP = pathlib.Path(__file__).parents[1] / "setup.cfg"


def declared(requirement: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    low, high = re.search(r">=([\d.]+),<([\d.]+)", requirement).groups()
    return tuple(map(int, low.split("."))), tuple(map(int, high.split(".")))


def test_setup_cfg_declares_the_supported_range():
    config = configparser.ConfigParser()
    config.read(SETUP)
    requirements = config["options"]["install_requires"] + "\n".join(
        config["options.extras_require"].values()
    )
    for name, dist in (("keras", "keras"), ("tensorflow", "tensorflow")):
        pins = re.findall(
            rf"^\s*{dist}(?:-cpu|\[and-cuda\])?(>=[^;\s]+)", requirements, re.M
        )
        assert pins, name
        oldest, newest = SUPPORTED[name]
        for pin in pins:
            assert declared(pin) == (oldest, (newest[0], newest[1] + 1)), (name, pin)


def test_installed_versions_are_supported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions({"tensorflow": tf.__version__, "keras": keras.__version__})


def test_older_keras_is_refused_with_the_reason_and_the_fix():
    with pytest.raises(ImportError) as raised:
        check_versions({"tensorflow": "2.21.0", "keras": "3.13.2"})
    message = str(raised.value)
    assert "found Keras 3.13.2" in message
    assert "TensorFlow 2.16–2.21, Keras 3.14–3.15" in message
    assert "activity regularizer" in message
    assert 'pip install -U "keras>=3.14"' in message


def test_newer_tensorflow_is_warned_about():
    with pytest.warns(UserWarning, match="found TensorFlow 2.23.0, which is newer"):
        check_versions({"tensorflow": "2.23.0", "keras": "3.15.0"})


def test_import_refuses_an_old_keras():
    result = run_python(
        "import sys, types\n"
        "sys.modules['keras'] = types.SimpleNamespace(__version__='3.8.0', "
        "backend=types.SimpleNamespace(backend=lambda: 'tensorflow'))\n"
        "import keras_parallel"
    )
    assert result.returncode != 0
    assert "found Keras 3.8.0" in result.stderr
