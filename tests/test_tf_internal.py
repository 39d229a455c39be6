"""TensorFlow and Keras internals are used in `keras_parallel/_tf_internal.py`
only, and what it relies on exists in the installed versions."""

import ast
import functools
import gc
import pathlib

import keras_parallel
from keras_parallel import _tf_internal

ROOT = pathlib.Path(keras_parallel.__file__).parent
PROJECT = ROOT.parent
HOME = ROOT / "_tf_internal.py"
PRIVATE_PACKAGES = ("tensorflow.python", "keras.src")


@functools.cache
def sources() -> list:
    # Parsing makes many objects; in a test process that holds large Keras
    # graphs each garbage collection they trigger scans all of it (30 s+).
    gc.disable()
    try:
        return [
            (path, ast.parse(path.read_text(), str(path)))
            for folder in ("keras_parallel", "tests", "benchmarks", "examples")
            for path in sorted((PROJECT / folder).rglob("*.py"))
            if path != HOME
        ]
    finally:
        gc.enable()


def private_imports(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.startswith(PRIVATE_PACKAGES)]
    return found


def test_private_imports_only_in_the_internal_module():
    offenders = {
        str(path.relative_to(PROJECT)): names
        for path, tree in sources()
        if (names := private_imports(tree))
    }
    assert not offenders, offenders
    assert private_imports(ast.parse(HOME.read_text()))  # the check sees them


def our_private_names() -> set[str]:
    """Underscore names keras_parallel itself defines: functions, methods,
    classes, and attributes it assigns."""
    names = set()
    for path, tree in sources():
        if not path.is_relative_to(ROOT):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_")}


def test_private_attributes_of_tensorflow_and_keras_only_in_the_internal_module():
    """Every `obj._name` outside `_tf_internal.py` names something of ours,
    or a strategy hook/attribute that `_tf_internal` lists and checks."""
    allowed = our_private_names() | set(_tf_internal.EXTENDED_ATTRIBUTES)
    allowed |= {name for names in _tf_internal.HOOKS.values() for name in names}
    offenders = []
    for path, tree in sources():
        if not path.is_relative_to(ROOT):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in allowed
            ):
                offenders.append(
                    f"{path.relative_to(PROJECT)}:{node.lineno} {node.attr}"
                )
    assert not offenders, offenders


def test_hooks_exist_in_the_installed_versions():
    missing = [
        f"{cls.__qualname__}.{name}"
        for cls, names in _tf_internal.HOOKS.items()
        for name in names
        if not hasattr(cls, name)
    ]
    assert not missing, missing


def test_strategy_attributes_exist_in_the_installed_versions():
    for strategy in (
        keras_parallel.DataParallel(["CPU:0", "CPU:1"]),
        keras_parallel.PipelineParallel(["CPU:0", "CPU:1"]),
    ):
        base = type(strategy.extended).__mro__
        used = [
            name
            for name in _tf_internal.EXTENDED_ATTRIBUTES
            if any(name in vars(cls) for cls in base)
            or hasattr(strategy.extended, name)
        ]
        assert used, strategy
    extended = keras_parallel.DataParallel(["CPU:0", "CPU:1"]).extended
    missing = [n for n in _tf_internal.EXTENDED_ATTRIBUTES if not hasattr(extended, n)]
    assert not missing, missing


def test_variable_storage_moves_and_keeps_identity():
    """The one write into a Keras object: a variable's storage replaced by a
    copy on another device; the Keras variable, its value and the optimizer
    state keyed by it stay."""
    import keras
    import numpy as np

    from keras_parallel.placement import move_variable

    variable = keras.Variable(np.arange(6.0).reshape(2, 3), dtype="float32")
    optimizer = keras.optimizers.Adam()
    optimizer.build([variable])
    key = optimizer._var_key(variable)
    move_variable(variable, "/device:CPU:1")
    assert variable.value.device.endswith("CPU:1")
    np.testing.assert_array_equal(variable.numpy(), np.arange(6.0).reshape(2, 3))
    assert optimizer._var_key(variable) == key
    optimizer.apply([np.ones((2, 3), "float32")], [variable])
    assert variable.value.device.endswith("CPU:1")
