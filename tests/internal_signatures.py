"""Checks that what keras_parallel calls, overrides and reads of TensorFlow
and Keras internals matches the installed versions.

Private APIs change without deprecation; `hasattr` sees a renamed method but
not a renamed or added parameter. Each check reads our code (its AST, or its
classes' method order) and compares it with `inspect.signature` of what the
installed TensorFlow and Keras define, so it follows the code as it is
restructured; each returns a list of problems, empty when all is well.

Here: what the checks share, and calls of the names `_tf_internal` exports;
`internal_overrides.py`: our subclasses; `internal_module.py`: what
`_tf_internal` itself calls and reads.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys

# Keras 3 never hands us objects of TensorFlow's bundled legacy Keras.
LEGACY = ("tensorflow.python.keras",)


def is_foreign(obj) -> bool:
    """Whether `obj` (a module, class or function) comes from TensorFlow or
    Keras."""
    if inspect.ismodule(obj):
        module = obj.__name__
    else:
        module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in ("tensorflow", "keras")


# --- binding a call to a signature -------------------------------------------


def binding_problem(callee, call: ast.Call, self_arg: bool = False) -> str | None:
    """Why `call` (its argument count and keyword names; values replaced by
    placeholders) does not bind to `callee`'s signature, or None.
    `self_arg`: `callee` is a plain function reached through its class, and
    the call passes the instance implicitly."""
    try:
        signature = inspect.signature(callee)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: nothing to compare
    starred = any(isinstance(arg, ast.Starred) for arg in call.args)
    positional = [None] * (
        self_arg + sum(not isinstance(a, ast.Starred) for a in call.args)
    )
    keywords = {k.arg: None for k in call.keywords if k.arg is not None}
    unpacked = starred or any(k.arg is None for k in call.keywords)
    try:
        bind = signature.bind_partial if unpacked else signature.bind
        bind(*positional, **keywords)
    except TypeError as error:
        return f"{error} (signature {signature})"
    return None


def descriptor_kind(attribute) -> str:
    for kind in (staticmethod, classmethod, property):
        if isinstance(attribute, kind):
            return kind.__name__
    return "method" if inspect.isfunction(attribute) else "value"


@functools.cache
def foreign_definitions() -> dict[str, list[type]]:
    """Attribute name -> the TensorFlow and Keras classes (of the modules
    loaded now) that define it in their own body."""
    found: dict[str, list[type]] = {}
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or not is_foreign(module) or name.startswith(LEGACY):
            continue
        for value in list(vars(module).values()):
            if inspect.isclass(value) and is_foreign(value) and id(value) not in seen:
                seen.add(id(value))
                if not value.__module__.startswith(LEGACY):
                    for attribute in vars(value):
                        found.setdefault(attribute, []).append(value)
    return found


@functools.cache
def foreign_source() -> tuple[str, ...]:
    """The source lines of every TensorFlow and Keras module loaded now."""
    lines: list[str] = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if is_foreign(module) and not name.startswith(LEGACY) and path.endswith(".py"):
            with open(path, encoding="utf-8", errors="replace") as file:
                lines += file.read().splitlines()
    return tuple(lines)


def in_source(name: str, pattern: str) -> bool:
    matcher = re.compile(pattern)
    return any(matcher.search(line) for line in foreign_source() if name in line)


def defined_in_source(name: str) -> bool:
    """Whether TensorFlow or Keras assigns or defines `name`."""
    return in_source(
        name, rf"(\.{name}\s*(:[^=]*)?=[^=])|(\bdef {name}\b)|(^\s*{name}\s*[:=])"
    )


def read_in_source(name: str) -> bool:
    """Whether TensorFlow or Keras reads attribute `name` of some object."""
    return in_source(
        name, rf"\.{name}\b(?!\s*=[^=])|getattr\([^,]+,\s*['\"]{name}['\"]"
    )


# --- calls through names imported from `_tf_internal` --------------------------


def imported_from(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> name in `module`, for `from module import ...`."""
    return {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def internal_call_problems(tree: ast.Module, internal) -> list[str]:
    """Each call in `tree` of a name imported from `internal` (the
    `_tf_internal` module), or of an attribute of one, must bind to it."""
    names = imported_from(tree, internal.__name__)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, attribute = node.func, None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            func, attribute = func.value, func.attr
        if not isinstance(func, ast.Name) or func.id not in names:
            continue
        callee = getattr(internal, names[func.id])
        label = names[func.id]
        if attribute is not None:
            label += f".{attribute}"
            callee = getattr(callee, attribute, None)
            if callee is None:
                problems.append(f"line {node.lineno}: {label} does not exist")
                continue
        if problem := binding_problem(callee, node):
            problems.append(f"line {node.lineno}: {label}(...): {problem}")
    return problems
