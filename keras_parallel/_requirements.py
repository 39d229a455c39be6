"""Import-time checks that TensorFlow is installed, Keras runs on it, and
both are versions the test suite passes on."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import warnings

# (oldest, newest) minor versions `.ci/run` proves: `make test` runs the suite
# on the newest pair, `make test-oldest` the transparency tests on the oldest.
# setup.cfg declares the same range (tests/test_requirements.py checks).
SUPPORTED = {"tensorflow": ((2, 16), (2, 21)), "keras": ((3, 14), (3, 15))}

# What goes wrong below the oldest version (measured with MirroredStrategy as
# well as ours, so it is not ours to work around).
_TOO_OLD = {
    "tensorflow": "it is not tested",
    "keras": (
        "Keras before 3.14 scales a layer's activity regularizer by each "
        "replica's batch instead of the global batch (weights 4e-3 away from "
        "one device after one epoch), and before 3.10 it reports wrong metrics "
        "under any tf.distribute strategy"
    ),
}


def check_requirements() -> None:
    """Raises ImportError with a fix when TensorFlow or the Keras backend is wrong."""
    # Looked up, not imported: `keras-parallel launch` must start at once.
    if not _installed("tensorflow"):
        raise ImportError(
            "keras_parallel needs TensorFlow, which is not installed. Install "
            "it with the package: `pip install keras-parallel[cpu]` "
            "(tensorflow-cpu) or `pip install keras-parallel[gpu]` "
            "(tensorflow, with CUDA on Linux)."
        )
    backend = _keras_backend()
    if backend != "tensorflow":
        raise ImportError(
            f"keras_parallel needs Keras on the TensorFlow backend, but Keras "
            f"is using {backend!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before Keras is first imported (or set "
            '"backend": "tensorflow" in ~/.keras/keras.json) and restart.'
        )
    versions = {name: _version(name) for name in SUPPORTED}
    check_versions({name: v for name, v in versions.items() if v is not None})


def check_versions(found: dict[str, str]) -> None:
    """Raises ImportError for a TensorFlow or Keras older than supported and
    warns for one newer than tested.

    Args:
        found: `{"tensorflow": "2.21.0", "keras": "3.15.1"}`; missing names
            are not checked.
    """
    supported = ", ".join(
        f"{_name(n)} {_text(old)}–{_text(new)}" for n, (old, new) in SUPPORTED.items()
    )
    for name, version in found.items():
        minor = _minor(version)
        oldest, newest = SUPPORTED[name]
        if minor is None:
            continue
        if minor < oldest:
            raise ImportError(
                f"keras_parallel supports {supported}; found {_name(name)} "
                f"{version}. Below {_text(oldest)} {_TOO_OLD[name]}. Upgrade: "
                f'`pip install -U "{name}>={_text(oldest)}"`.'
            )
        if minor > newest:
            warnings.warn(
                f"keras_parallel is tested with {supported}; found "
                f"{_name(name)} {version}, which is newer and untested. If "
                "training differs from one device, report it with the versions.",
                stacklevel=3,
            )


def _name(package: str) -> str:
    return {"tensorflow": "TensorFlow", "keras": "Keras"}[package]


def _text(minor: tuple[int, int]) -> str:
    return f"{minor[0]}.{minor[1]}"


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def _version(module: str) -> str | None:
    """The installed version of the distribution providing `module` (for
    TensorFlow: tensorflow, tensorflow-cpu, tf-nightly, ...), read from its
    metadata without importing it; None when no metadata says."""
    if module in sys.modules and hasattr(sys.modules[module], "__version__"):
        return sys.modules[module].__version__
    for name in _distributions().get(module, []):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def _distributions() -> dict[str, list[str]]:
    # One scan of the installed distributions for all the modules asked about.
    return importlib.metadata.packages_distributions()


def _installed(name: str) -> bool:
    if name in sys.modules:  # None there means "import blocked"
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _keras_backend() -> str:
    """The backend Keras runs on, or will pick when imported.

    Read without importing Keras when it is not loaded yet: importing it on a
    backend whose package is missing would fail with that package's error.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as config:
            return json.load(config).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"
