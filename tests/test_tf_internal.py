"""TensorFlow and Keras internals are used in `keras_parallel/_tf_internal.py`
only, and what it relies on exists in the installed versions with the
signatures our calls and overrides assume (`internal_signatures.py`)."""

import ast
import functools
import gc
import importlib
import pathlib
import textwrap

import internal_module
import internal_overrides
import internal_signatures

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
    # Public despite the underscore: `os._exit` ends a process stuck on a
    # lost parameter server without running TensorFlow's teardown.
    allowed |= {"_exit"}
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


# --- signatures: what we call, override and read, against the installed code --


def package_modules() -> list:
    """(module, AST) of every keras_parallel module but `__main__` (importing
    it runs the command line)."""
    found = [(_tf_internal, ast.parse(HOME.read_text()))]
    for path, tree in sources():
        if path.is_relative_to(ROOT) and path.name != "__main__.py":
            name = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
            found.append(
                (importlib.import_module(name.removesuffix(".__init__")), tree)
            )
    return found


def package_classes() -> dict:
    """Each class keras_parallel defines -> its ClassDef."""
    return {
        getattr(module, node.name): node
        for module, tree in package_modules()
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }


def test_calls_of_internal_names_bind_to_their_signatures():
    problems = {
        module.__name__: found
        for module, tree in package_modules()
        if (found := internal_signatures.internal_call_problems(tree, _tf_internal))
    }
    assert not problems, problems


def test_internal_module_calls_of_tensorflow_and_keras_bind():
    tree = ast.parse(HOME.read_text())
    problems = internal_module.foreign_call_problems(tree, vars(_tf_internal))
    assert not problems, problems


def test_overrides_and_super_calls_match_tensorflow_and_keras():
    classes = package_classes()
    assert any(issubclass(cls, _tf_internal.MirroredExtended) for cls in classes)
    problems = internal_overrides.hierarchy_problems(classes)
    assert not problems, problems


def test_private_attributes_we_read_and_set_exist():
    tree = ast.parse(HOME.read_text())
    problems = internal_module.private_attribute_problems(tree, vars(_tf_internal))
    assert not problems, problems
    our_reads = {
        node.attr
        for _, tree in package_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
    }
    problems = internal_overrides.unread_attribute_problems(
        package_classes(), our_reads
    )
    assert not problems, problems


# The checks fail on wrong code: each synthetic source below makes one mistake
# per line marked `# wrong`, which the check must report by line.


def synthetic(source: str) -> tuple[ast.Module, dict]:
    source = textwrap.dedent(source)
    namespace = {"__name__": "synthetic"}
    exec(compile(source, "synthetic", "exec"), namespace)
    return ast.parse(source), namespace


def wrong_lines(source: str) -> set[int]:
    lines = textwrap.dedent(source).splitlines()
    return {number for number, line in enumerate(lines, 1) if "# wrong" in line}


def reported_lines(problems: list[str]) -> set[int]:
    return {int(p.split("line ")[1].split(":")[0]) for p in problems}


def test_wrong_calls_of_internal_names_are_reported():
    source = """
        from keras_parallel._tf_internal import PerReplica, regroup
        regroup([1], None, False)
        regroup([1], None, False, 4)  # wrong
        regroup([1], always_wrap=True)
        regroup([1], allways_wrap=True)  # wrong
        PerReplica(values=[1])
        PerReplica([1], [2])  # wrong
        PerReplica.experimental_local_results  # an attribute, not a call
        """
    problems = internal_signatures.internal_call_problems(
        ast.parse(textwrap.dedent(source)), _tf_internal
    )
    assert reported_lines(problems) == wrong_lines(source), problems


def test_wrong_calls_in_the_internal_module_are_reported():
    source = """
        import keras
        import tensorflow as tf
        from tensorflow.python.distribute import distribute_utils

        def regroups(values):
            distribute_utils.regroup(values, always_wrap=True)
            return distribute_utils.regroup(values, wrap=None)  # wrong

        def flattens(model: keras.Model):
            model._flatten_layers(include_self=False)
            return model._flatten_layers(include_self=False, deep=True)  # wrong

        def applies(optimizer, grads, variables):
            optimizer._common_apply(grads, variables)
            optimizer._common_apply(grads, trainable_variables=variables)
            optimizer._common_apply(grads, variables=variables)  # wrong
            optimizer._no_such_private_method()  # wrong

        def gathers(value, destinations):
            made = tf.distribute.ReductionToOneDevice()
            made._gather_implementation(value, destinations, 0, None)
            return made._gather_implementation(value, destinations)  # wrong
        """
    tree, namespace = synthetic(source)
    problems = internal_module.foreign_call_problems(tree, namespace)
    assert reported_lines(problems) == wrong_lines(source), problems


def test_missing_private_attributes_are_reported():
    source = """
        import keras
        from tensorflow.python.framework import ops

        def reads(layer: keras.layers.MultiHeadAttention, variable):
            parts = [layer._query_dense, layer._key_dense]
            parts.append(layer._no_such_dense)  # wrong
            parts.append(getattr(variable, "_no_such_field", None))  # wrong
            parts.append(ops._gradient_registry)
            return parts, ops._no_such_registry  # wrong

        def writes(variable, weight):
            variable._distributed_container = weight
            variable._tensorflow_never_reads_this = weight  # wrong
        """
    tree, namespace = synthetic(source)
    problems = internal_module.private_attribute_problems(tree, namespace)
    assert reported_lines(problems) == wrong_lines(source), problems


def test_wrong_overrides_and_super_calls_are_reported():
    source = """
        from keras_parallel._tf_internal import MirroredExtended

        class Right(MirroredExtended):
            def _update(self, var, fn, args, kwargs, group):
                return super()._update(var, fn, args, kwargs, group)

            def _reduce_to(self, reduce_op, value, destinations, options):
                return super()._reduce_to(reduce_op, value, destinations, options)

            def _use_merge_call(self):
                return super()._use_merge_call()

        class Wrong(MirroredExtended):
            def _update(self, var, fn, args, kwargs):
                return super()._update(var, fn, args, kwargs, group=True, now=1)

            def _reduce_to(self, op, value, destinations, options):
                return super()._reduce_to(op, value, destinations)

            def _use_merge_call(self, value):
                return super()._use_merge_call()

        class GlobalMoments:
            def _moments(self, inputs):
                return super()._moments(inputs)
        """
    tree, namespace = synthetic(source)
    classes = {
        namespace[node.name]: node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    problems = internal_overrides.hierarchy_problems(classes)
    assert not [p for p in problems if p.startswith("Right.")], problems
    expected = [
        "Wrong._update overrides",  # no `group`
        "Wrong._update, line",  # super() with `now`
        "Wrong._reduce_to overrides",  # `op` for `reduce_op`
        "Wrong._reduce_to, line",  # no `options` passed
        "Wrong._use_merge_call overrides",  # requires `value`
        "GlobalMoments._moments overrides",  # no `mask`
        "GlobalMoments._moments, line",  # no `mask` passed
    ]
    for start in expected:
        assert [p for p in problems if p.startswith(start)], (start, problems)


def test_attributes_only_tensorflow_would_read_must_be_read_there():
    source = """
        from keras_parallel._tf_internal import MirroredExtended

        class Extended(MirroredExtended):
            _collective_key_base = 1  # MirroredExtended reads it
            _read_by_nobody = 1
            _read_by_us = 1
        """
    tree, namespace = synthetic(source)
    classes = {namespace["Extended"]: tree.body[1]}
    problems = internal_overrides.unread_attribute_problems(classes, {"_read_by_us"})
    assert problems == [
        "Extended._read_by_nobody: neither keras_parallel nor TensorFlow/Keras reads it"
    ]
