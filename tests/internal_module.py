"""What `keras_parallel/_tf_internal.py` calls and reads of TensorFlow and
Keras, against the installed versions (see `internal_signatures.py`)."""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass

from internal_signatures import (
    binding_problem,
    defined_in_source,
    descriptor_kind,
    foreign_definitions,
    is_foreign,
    read_in_source,
)


@dataclass(frozen=True)
class Known:
    """An object the code names: a module, class, function or value."""

    value: object


@dataclass(frozen=True)
class Instance:
    """An instance of `cls` (made by calling it, or a parameter annotated so)."""

    cls: type


@dataclass(frozen=True)
class Returned:
    """The result of a function of `module`: an instance of one of its
    classes, if any defines the attribute asked for."""

    module: str


@dataclass(frozen=True)
class Method:
    """A class attribute reached through an instance."""

    cls: type
    attribute: object


class Resolver:
    """Resolves the names, attributes and calls of one function of a module
    (`namespace`: the module's globals) to what they are when it runs."""

    def __init__(self, namespace: dict, function: ast.FunctionDef | None):
        self.namespace = dict(namespace)
        self.locals: dict[str, ast.expr] = {}
        self.resolved: dict[str, object] = {}
        self.problems: list[str] = []
        if function is None:
            return
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    self.namespace[alias.asname or alias.name] = getattr(
                        module, alias.name
                    )
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                self.locals[node.targets[0].id] = node.value
        arguments = function.args
        for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs:
            self.locals.pop(arg.arg, None)
            self.namespace.pop(arg.arg, None)
            if arg.annotation is not None:
                annotation = arg.annotation
                if isinstance(annotation, ast.Constant):  # a string annotation
                    annotation = ast.parse(annotation.value, mode="eval").body
                annotation = self.resolve(annotation)
                if isinstance(annotation, Known) and inspect.isclass(annotation.value):
                    self.namespace[arg.arg] = Instance(annotation.value)

    def resolve(self, node: ast.expr):
        if isinstance(node, ast.Name):
            if node.id in self.locals:
                if node.id not in self.resolved:
                    self.resolved[node.id] = None  # `x = f(x)` stops here
                    self.resolved[node.id] = self.resolve(self.locals[node.id])
                return self.resolved[node.id]
            if node.id not in self.namespace:
                return None
            value = self.namespace[node.id]
            return value if isinstance(value, Instance) else Known(value)
        if isinstance(node, ast.Attribute):
            return self.attribute(self.resolve(node.value), node)
        if isinstance(node, ast.Call):
            called = self.resolve(node.func)
            if isinstance(called, Known) and inspect.isclass(called.value):
                return Instance(called.value)
            if isinstance(called, Known) and inspect.isfunction(called.value):
                return Returned(called.value.__module__)
        return None

    def attribute(self, owner, node: ast.Attribute):
        name = node.attr
        if isinstance(owner, Known):
            if not hasattr(owner.value, name):
                self.problems.append(
                    f"line {node.lineno}: {owner.value!r} has no `{name}`"
                )
                return None
            return Known(getattr(owner.value, name))
        if isinstance(owner, Returned):
            classes = [
                c
                for c in foreign_definitions().get(name, [])
                if c.__module__ == owner.module
            ]
            owner = Instance(classes[0]) if len(classes) == 1 else None
        if isinstance(owner, Instance):
            for cls in owner.cls.__mro__:
                if name in vars(cls):
                    return Method(cls, vars(cls)[name])
        return None


def functions_of(tree: ast.Module) -> list[ast.FunctionDef | None]:
    """The module's functions and methods, and None for its top level."""
    return [None] + [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
    ]


def own_statements(tree: ast.Module, function) -> list[ast.AST]:
    """The nodes of `function` (or of the module's top level, outside any
    function) without those of functions nested in it."""
    if function is not None:
        roots = [function]
    else:
        roots = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    found, stack = [], list(roots)
    while stack:
        node = stack.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append(child)
    return found


def foreign_call_problems(tree: ast.Module, namespace: dict) -> list[str]:
    """Each call in `tree` (the internal module; `namespace` its globals) of
    a TensorFlow/Keras function, class or method, as far as its receiver is
    known (a name, a parameter's annotation, an object the module makes, or
    a private method only TensorFlow/Keras classes define), must bind."""
    problems = []
    for function in functions_of(tree):
        resolver = Resolver(namespace, function)
        for node in own_statements(tree, function):
            if isinstance(node, ast.Call):
                problems += call_problems(resolver, node)
        problems += resolver.problems
    return sorted(set(problems))


def call_problems(resolver: Resolver, node: ast.Call) -> list[str]:
    callee = resolver.resolve(node.func)
    label = ast.unparse(node.func)
    if isinstance(callee, Known) and is_foreign(callee.value):
        problem = binding_problem(callee.value, node)
        return [f"line {node.lineno}: {label}(...): {problem}"] if problem else []
    if isinstance(callee, Method) and is_foreign(callee.cls):
        kind = descriptor_kind(callee.attribute)
        if kind in ("property", "value"):
            return []
        target = getattr(callee.attribute, "__func__", callee.attribute)
        problem = binding_problem(target, node, kind == "method")
        return [f"line {node.lineno}: {label}(...): {problem}"] if problem else []
    name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
    if callee is not None or not name.startswith("_") or name.startswith("__"):
        return []
    # A private method of an object of unknown class: one of the TensorFlow
    # or Keras classes defining it must take the call.
    candidates = [
        c for c in foreign_definitions().get(name, []) if callable(vars(c)[name])
    ]
    if not candidates:
        return [f"line {node.lineno}: no TensorFlow/Keras class defines {name}"]
    found = [
        binding_problem(vars(c)[name], node, descriptor_kind(vars(c)[name]) == "method")
        for c in candidates
    ]
    if all(found):
        return [f"line {node.lineno}: {label}(...): {found[0]}"]
    return []


# --- private attributes read or written ----------------------------------------


def private_attribute_problems(tree: ast.Module, namespace: dict) -> list[str]:
    """Each private attribute the internal module reads on a TensorFlow or
    Keras object must exist there (on the class or module when its owner is
    known, else assigned somewhere in their source); each it writes must be
    read there. Attributes of our own classes (`self._x` that the module
    assigns) are left out."""
    ours = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    problems = []
    for function in functions_of(tree):
        resolver = Resolver(namespace, function)
        for node in own_statements(tree, function):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr":
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    node = ast.Attribute(node.args[0], node.args[1].value, ast.Load())
                    node.lineno = node.value.lineno
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in ours:
                continue
            owner = resolver.resolve(node.value)
            if isinstance(owner, Known):
                resolver.attribute(owner, node)  # records a missing one
            elif isinstance(node.ctx, ast.Store):
                if not read_in_source(name):
                    problems.append(
                        f"line {node.lineno}: TensorFlow/Keras never read {name}"
                    )
            elif not (
                isinstance(owner, Instance) and hasattr(owner.cls, name)
            ) and not defined_in_source(name):
                problems.append(
                    f"line {node.lineno}: TensorFlow/Keras never set {name}"
                )
        problems += resolver.problems
    return sorted(set(problems))
