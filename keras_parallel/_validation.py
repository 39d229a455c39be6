"""Argument checks shared by the public classes."""

from __future__ import annotations


def check_int(name: str, value, least: int) -> int:
    """Returns `value` if it is an integer >= `least` (bools are not), else
    raises a ValueError naming the argument and what it received."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"`{name}` must be an integer >= {least}. Received: {name}={value!r}"
        )
    return value
