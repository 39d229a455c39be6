"""The package's import structure: no import circle, and the building blocks
(placement, reduction, layers, callbacks, ...) never import a strategy."""

import ast
import pathlib

import keras_parallel

ROOT = pathlib.Path(keras_parallel.__file__).parent
STRATEGIES = ("keras_parallel.data_parallel", "keras_parallel.pipeline")
# MeshParallel extends DataParallel (the same replicas, with split weights).
EXTENSIONS = {"keras_parallel.mesh": "keras_parallel.data_parallel"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The keras_parallel modules `name` imports, at any depth of its code;
    `from package import submodule` counts as importing the submodule."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_no_import_circle():
    circles = []

    def visit(name, path):
        for target in GRAPH[name]:
            if target in path:
                circles.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(GRAPH):
        if name not in done and name != "keras_parallel":
            visit(name, [name])
    assert not circles, circles


def test_building_blocks_do_not_import_strategies():
    blocks = [
        name
        for name in GRAPH
        if name != "keras_parallel"
        and not name.startswith(STRATEGIES + tuple(EXTENSIONS))
        and name not in ("keras_parallel.cli", "keras_parallel.demo")
        # The planner weighs and builds the strategies: it stands above them.
        and not name.startswith("keras_parallel.planning")
    ]
    offenders = {
        name: sorted(
            t for t in GRAPH[name] if t.startswith(STRATEGIES + tuple(EXTENSIONS))
        )
        for name in blocks
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert "keras_parallel.layers.sharding" in blocks  # the check sees the layers


def test_strategies_do_not_import_each_other():
    for own, other in (STRATEGIES, STRATEGIES[::-1]):
        for name in GRAPH:
            if name.startswith(own):
                assert not [t for t in GRAPH[name] if t.startswith(other)], name


def test_extensions_import_only_the_strategy_they_extend():
    for extension, base in EXTENSIONS.items():
        for name in GRAPH:
            strategies = [t for t in GRAPH[name] if t.startswith(STRATEGIES)]
            if name.startswith(extension):
                assert all(t.startswith(base) for t in strategies), name
            elif name.startswith(STRATEGIES):
                assert not [t for t in GRAPH[name] if t.startswith(extension)], name
