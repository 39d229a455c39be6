"""Our subclasses of TensorFlow and Keras classes, against their bases (see
`internal_signatures.py`)."""

from __future__ import annotations

import ast
import inspect

from internal_signatures import (
    binding_problem,
    descriptor_kind,
    foreign_definitions,
    is_foreign,
    read_in_source,
)

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
BY_NAME = (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)


def parameters(attribute) -> list[inspect.Parameter]:
    """Parameters a caller passes (without `self`/`cls`)."""
    function = getattr(attribute, "__func__", attribute)
    listed = list(inspect.signature(function).parameters.values())
    return listed if isinstance(attribute, staticmethod) else listed[1:]


def override_problems(base, override) -> list[str]:
    """Ways a call that `base` accepts would fail or change meaning on
    `override` (both raw class attributes, as in `vars(cls)`)."""
    kinds = descriptor_kind(base), descriptor_kind(override)
    if kinds[0] != kinds[1]:
        return [f"a {kinds[1]} overrides a {kinds[0]}"]
    if kinds[0] in ("property", "value"):
        return []
    theirs, ours = parameters(base), parameters(override)
    our_names = {p.name: p for p in ours}
    our_positional = [p for p in ours if p.kind in POSITIONAL]
    takes_args = any(p.kind == P.VAR_POSITIONAL for p in ours)
    takes_kwargs = any(p.kind == P.VAR_KEYWORD for p in ours)
    problems = []
    their_positional = [p for p in theirs if p.kind in POSITIONAL]
    for index, param in enumerate(their_positional):
        if index >= len(our_positional):
            if not takes_args:
                problems.append(f"does not take positional `{param.name}`")
            continue
        mine = our_positional[index]
        if param.kind == P.POSITIONAL_OR_KEYWORD and mine.name != param.name:
            problems.append(
                f"names positional parameter {index + 1} `{mine.name}`, "
                f"the base `{param.name}`"
            )
        if param.default is not P.empty and mine.default is P.empty:
            problems.append(f"requires `{mine.name}`, which the base defaults")
    for param in theirs:
        if param.kind == P.KEYWORD_ONLY:
            mine = our_names.get(param.name)
            if mine is None or mine.kind not in BY_NAME:
                if not takes_kwargs:
                    problems.append(f"does not take keyword `{param.name}`")
            elif param.default is not P.empty and mine.default is P.empty:
                problems.append(f"requires `{mine.name}`, which the base defaults")
        elif param.kind == P.VAR_POSITIONAL and not takes_args:
            problems.append(f"does not take *{param.name}")
        elif param.kind == P.VAR_KEYWORD and not takes_kwargs:
            problems.append(f"does not take **{param.name}")
    their_names = {p.name for p in theirs}
    extra = our_positional[len(their_positional) :] + [
        p for p in ours if p.kind == P.KEYWORD_ONLY and p.name not in their_names
    ]
    problems += [
        f"requires `{p.name}`, which the base does not pass"
        for p in extra
        if p.default is P.empty
    ]
    return problems


def super_calls(function: ast.FunctionDef) -> list[ast.Call]:
    """The `super().name(...)` calls in `function`."""
    return [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Call)
        and isinstance(node.func.value.func, ast.Name)
        and node.func.value.func.id == "super"
        and not node.func.value.args
    ]


def deferred(tree: ast.ClassDef) -> set[str]:
    """Methods of a class that call `super()`'s method of the same name: a
    mixin made to go before a class defining them."""
    return {
        call.func.attr
        for method in tree.body
        if isinstance(method, ast.FunctionDef) and method.name != "__init__"
        for call in super_calls(method)
        if call.func.attr == method.name
    }


def owners(cls: type, tree: ast.ClassDef, derived: list[type]) -> list[type]:
    """The classes `cls` is part of: those of `derived` (ours, deriving from
    TensorFlow/Keras) whose method order contains it; for a mixin that
    specialize.py puts before a user's class while a step is traced, every
    TensorFlow/Keras class defining all the methods it defers to."""
    found = [c for c in derived if cls in c.__mro__]
    # Keras' public methods (`call`, ...) are defined by too many classes to
    # tell which one; a private one names the class.
    names = {name for name in deferred(tree) if name.startswith("_")}
    if found or not names:
        return found
    candidates = {c for n in names for c in foreign_definitions().get(n, [])}
    return [c for c in candidates if all(hasattr(c, n) for n in names)]


def overridden(cls: type, name: str, owner: type) -> list[type]:
    """The TensorFlow/Keras classes in `owner`'s method order after `cls`
    defining `name` (also past classes of ours that redefine it, which
    TensorFlow calls the same way): the nearest and the farthest, the
    interface declaring it. Keras' public methods (`call`, `build`, ...) are
    made for subclasses to redefine with their own arguments: left out."""
    order = owner.__mro__
    after = order[order.index(cls) + 1 :] if cls in order else order
    foreign = [base for base in after if name in vars(base) and is_foreign(base)]
    if not foreign or (not name.startswith("_") and is_keras(foreign[0])):
        return []
    return [foreign[0], foreign[-1]]


def is_keras(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "keras"


def class_problems(cls: type, tree: ast.ClassDef, derived: list[type]) -> list[str]:
    """Problems of one of our classes `cls` (its AST `tree`; `derived`: our
    classes deriving from TensorFlow/Keras ones): each method overriding a
    TensorFlow/Keras one must accept the calls the base (or the interface
    declaring it) accepts, and each `super().name(...)` must bind to the
    method it reaches."""
    problems = []
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    parts_of = owners(cls, tree, derived)
    for name, attribute in vars(cls).items():
        if name.startswith("__") or name == "_abc_impl":
            continue
        for owner in parts_of:
            bases = overridden(cls, name, owner)
            found = [override_problems(vars(b)[name], attribute) for b in bases]
            if found and all(found):
                problems += [
                    f"{cls.__qualname__}.{name} overrides {bases[0].__module__}."
                    f"{bases[0].__qualname__}.{name}: {problem}"
                    for problem in found[0]
                ]
        for call in super_calls(functions[name]) if name in functions else []:
            for owner in parts_of:
                problems += super_call_problems(cls, name, call, owner)
    return sorted(set(problems))


def super_call_problems(cls: type, name: str, call: ast.Call, owner: type):
    """Why `call` (a `super()` call in `cls.name`) does not bind to the
    TensorFlow/Keras method it reaches in `owner`, if it reaches one."""
    order = owner.__mro__
    after = order[order.index(cls) + 1 :] if cls in order else order
    reached = next((b for b in after if call.func.attr in vars(b)), None)
    if reached is None or overridden(cls, call.func.attr, owner)[:1] != [reached]:
        return []  # a class of ours, checked in turn
    target = vars(reached)[call.func.attr]
    kind = descriptor_kind(target)
    if kind not in ("method", "staticmethod", "classmethod"):
        return []
    problem = binding_problem(
        getattr(target, "__func__", target), call, kind == "method"
    )
    if not problem:
        return []
    return [
        f"{cls.__qualname__}.{name}, line {call.lineno}: super()."
        f"{call.func.attr}(...) on {reached.__qualname__}: {problem}"
    ]


def hierarchy_problems(classes: dict[type, ast.ClassDef]) -> list[str]:
    """`class_problems` of each of `classes` (ours, with their AST)."""
    derived = [c for c in classes if any(map(is_foreign, c.__mro__))]
    problems = []
    for cls, tree in classes.items():
        problems += class_problems(cls, tree, derived)
    return problems


def unread_attribute_problems(
    classes: dict[type, ast.ClassDef], our_reads: set[str]
) -> list[str]:
    """Private values our TensorFlow/Keras-derived classes set in their body
    that no base defines: our code reads them (`our_reads`) or TensorFlow
    or Keras does (e.g. `_collective_key_base`), which must still be so."""
    problems = []
    for cls in classes:
        order = cls.__mro__
        if not any(map(is_foreign, order)):
            continue
        for name, value in vars(cls).items():
            if (
                not name.startswith("_")
                or name.startswith("__")
                or name == "_abc_impl"
                or descriptor_kind(value) != "value"
                or any(name in vars(base) for base in order[1:] if is_foreign(base))
            ):
                continue
            if name not in our_reads and not read_in_source(name):
                problems.append(
                    f"{cls.__qualname__}.{name}: neither keras_parallel nor "
                    "TensorFlow/Keras reads it"
                )
    return problems
