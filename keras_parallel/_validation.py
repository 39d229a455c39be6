"""Argument checks shared by the public classes."""

from __future__ import annotations

import tensorflow as tf


def check_int(name: str, value, least: int) -> int:
    """Returns `value` if it is an integer >= `least` (bools are not), else
    raises a ValueError naming the argument and what it received."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"`{name}` must be an integer >= {least}. Received: {name}={value!r}"
        )
    return value


def check_cluster_resolver(cluster_resolver) -> None:
    """Raises a TypeError naming `cluster_resolver` unless it is a
    `tf.distribute.cluster_resolver.ClusterResolver`."""
    if not isinstance(cluster_resolver, tf.distribute.cluster_resolver.ClusterResolver):
        raise TypeError(
            "`cluster_resolver` must be a "
            "tf.distribute.cluster_resolver.ClusterResolver (e.g. "
            "TFConfigClusterResolver or SimpleClusterResolver). Received: "
            f"cluster_resolver={cluster_resolver!r}"
        )
